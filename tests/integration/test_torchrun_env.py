"""The worker environment against torchrun 2.13's own: the same script is started by
``torchrun --standalone`` and by ``elastic-agent start --standalone``; every variable
torchrun adds, the agent adds too, with the same meaning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import torchrun_env

DUMP = Path(__file__).resolve().parents[1] / "bin" / "dump_env.py"
BASE = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def worker_envs(command: list[str], cwd: Path) -> list[dict[str, str]]:
    proc = subprocess.run(command, env=torchrun_env(BASE, cwd), cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    envs = [json.loads(line.split("ENV ", 1)[1]) for line in proc.stdout.splitlines() if "ENV {" in line]
    assert len(envs) == 2, proc.stdout[-2000:]
    return sorted(envs, key=lambda e: int(e["RANK"]))


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    torchrun = worker_envs([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(DUMP)], tmp_path_factory.mktemp("torchrun"))
    agent = worker_envs([sys.executable, "-m", "agent", "start", "--standalone", "--nproc-per-node", "2",
                         "--metrics-port", "0", "--no-prewarm", "--", sys.executable, str(DUMP)],
                        tmp_path_factory.mktemp("agent"))
    return torchrun, agent


def test_every_variable_torchrun_sets_the_agent_sets(both) -> None:
    torchrun, agent = both
    for theirs, ours in zip(torchrun, agent):
        added = set(theirs) - set(BASE)
        assert added - set(ours) == set(), "torchrun sets these for its workers and we do not"


def test_the_same_meaning(both) -> None:
    torchrun, agent = both
    same_values = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                   "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "TORCHELASTIC_RESTART_COUNT",
                   "TORCHELASTIC_SIGNALS_TO_HANDLE", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS"]
    for theirs, ours in zip(torchrun, agent):
        assert {k: ours[k] for k in same_values} == {k: theirs[k] for k in same_values}
        for path_var in ("TORCHELASTIC_ERROR_FILE",):
            assert os.path.isabs(ours[path_var]) and ours[path_var].endswith(f"/{ours['LOCAL_RANK']}/error.json")
        assert ours["MASTER_PORT"].isdigit() and ours["TORCHELASTIC_MAX_RESTARTS"].isdigit()
        # Our rendezvous store is etcd, not a store inside one agent: workers build their own.
        assert ours["TORCHELASTIC_USE_AGENT_STORE"] == "False"
