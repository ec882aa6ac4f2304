"""The Slurm scenarios (placeholder until written)."""
from __future__ import annotations
from pathlib import Path
from tests.deploy_check.procs import Procs


def run(deploy: Path, work: Path, procs: Procs, etcd: str) -> None:
    raise NotImplementedError
