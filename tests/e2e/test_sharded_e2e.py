"""FSDP2 checkpoints on disk, under real agents and etcd, gloo on CPU (docs/examples/train_fsdp.py).

A job of 2 nodes x 1 worker trains 6 steps with a checkpoint after steps 2 and 5; each rank
holds only its shards. Rank 0 dumps the full (gathered) model and optimizer state at those
steps. Then new jobs on the same checkpoint directory resume at world sizes 1, 2 and 3 and
dump the state they loaded: it must equal the saved one exactly (a load copies bytes, so
there is no arithmetic to forgive). The resumed state is compared right after the load, not
after more training: data-parallel batches differ with the world size, a load must not.

Before sharded state went through DCP, rank 0 wrote only its own shards and every rank
resumed from them: same world size, a silently different model; a smaller one, a crash.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from rendezvous.etcd.server import EtcdServer
from tests.e2e.harness import PYTHON, REPO, Cluster

EXAMPLE = REPO / "docs" / "examples" / "train_fsdp.py"
STEPS = 6

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(data_dir=str(tmp_path_factory.mktemp("etcd"))).start()
    try:
        yield server
    finally:
        server.stop()


def run_job(etcd: EtcdServer, workdir: Path, job: str, *, nodes: int, nproc: int, args: list[str]) -> str:
    """Run the example to its end under ``nodes`` agents of ``nproc`` workers; their output."""
    with Cluster(job_id=job, workdir=str(workdir), endpoints=etcd.endpoint) as cluster:
        command = [PYTHON, str(EXAMPLE), "--steps", str(STEPS), "--checkpoint-every", "3",
                   "--dump-dir", str(workdir / f"dump-{job}"), *args]
        agents = [cluster.start_agent(f"node-{n}", min_nodes=nodes, max_nodes=nodes, nproc=nproc, command=command)
                  for n in range(nodes)]
        codes = [agent.wait(timeout=120) for agent in agents]
        text = "\n".join(agent.text() for agent in agents)
    assert codes == [0] * nodes, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    return text


@pytest.fixture(scope="module")
def trained(etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work directory whose ckpt/ holds the checkpoints of steps 2 and 5 of a 2-rank job."""
    workdir = tmp_path_factory.mktemp("fsdp")
    run_job(etcd, workdir, "fsdp-train", nodes=2, nproc=1, args=["--dump-at", "2", "--dump-at", "5"])
    return workdir


def assert_same(saved: Any, loaded: Any, where: str = "state") -> None:
    if isinstance(saved, dict):
        assert sorted(saved, key=str) == sorted(loaded, key=str), where
        for key in saved:
            assert_same(saved[key], loaded[key], f"{where}.{key}")
    elif isinstance(saved, list):
        assert len(saved) == len(loaded), where
        for i, (a, b) in enumerate(zip(saved, loaded)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(saved, torch.Tensor):
        assert torch.equal(saved, loaded), f"{where} differs after the resume"
    else:
        assert saved == loaded, where


def sum_of_squares(state: dict) -> float:
    return sum(float((t.double() ** 2).sum()) for t in state["model"].values())


def load(path: Path) -> Any:
    return torch.load(path, weights_only=False)  # written by this test's own job


@pytest.mark.parametrize("world_size", [2, 3, 1])
def test_a_resume_at_any_world_size_loads_exactly_the_saved_model_and_optimizer(
        etcd: EtcdServer, trained: Path, world_size: int, tmp_path: Path) -> None:
    workdir = tmp_path / "job"
    shutil.copytree(trained / "ckpt", workdir / "ckpt")
    job = f"fsdp-resume-{world_size}"
    text = run_job(etcd, workdir, job, nodes=1, nproc=world_size, args=["--dump-loaded"])
    assert f"fsdp: starting at step {STEPS}, world size {world_size}" in text, text[-4000:]
    saved = load(trained / "dump-fsdp-train" / "saved_5.pt")
    loaded = load(workdir / f"dump-{job}" / f"loaded_{STEPS}.pt")
    assert sum_of_squares(loaded) == sum_of_squares(saved)
    assert loaded["opt"]["state"], "the optimizer state was not loaded"
    assert_same(saved, loaded)


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_damaged_shard_falls_back_to_the_older_complete_checkpoint_on_every_rank(
        etcd: EtcdServer, trained: Path, damage: str, tmp_path: Path) -> None:
    workdir = tmp_path / "job"
    shutil.copytree(trained / "ckpt", workdir / "ckpt")
    shard = workdir / "ckpt" / "step_000000000005" / "__1_0.distcp"
    if damage == "missing":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    job = f"fsdp-{damage}"
    text = run_job(etcd, workdir, job, nodes=1, nproc=2, args=["--dump-loaded", "--steps", "3"])
    assert f"checkpoint file {shard}" in text and "trying an older checkpoint" in text, text[-4000:]
    assert "fsdp: starting at step 3, world size 2" in text, text[-4000:]
    assert_same(load(trained / "dump-fsdp-train" / "saved_2.pt"), load(workdir / f"dump-{job}" / "loaded_3.pt"))
