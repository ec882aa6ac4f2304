"""FSDP2 under ``el.run``, end to end: 2 nodes x 2 workers (real agents, real etcd, gloo on CPU,
tests/bin/fsdp_inprocess_loop.py). A node is killed (kill -9 of its agent's process group):
the survivors re-form at world size 2 in the same processes and rebuild the lost node's
shards from the copies their node holds in memory (no disk checkpoint exists), and no step
the job printed is lost, wherever in a step the kill lands (by default a plain FSDP job's
copies are made before its optimizer step returns); then a node joins and the state is
re-sharded onto 4 ranks again.

After each, the full (gathered) parameters and Adam moments the job resumed from must equal
those the uninterrupted job had after that step, exactly: a recovery copies bytes, so there is
no arithmetic to forgive. (Training on after it is not compared: the batch is split by world
size, so the float sums differ by order.)"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from agent.daemon.workers.local import snapshots_of
from agent.worker.shard_store import SUBDIR
from tests.e2e.harness import PYTHON, alive, wait_until
from tests.e2e.inprocess_log import started_lines

pytestmark = pytest.mark.e2e

LOOP = str(Path(__file__).resolve().parents[1] / "bin" / "fsdp_inprocess_loop.py")
WAIT = 90.0


def assert_same(saved: Any, loaded: Any, where: str) -> None:
    if isinstance(saved, dict):
        assert sorted(saved, key=str) == sorted(loaded, key=str), where
        for key in saved:
            assert_same(saved[key], loaded[key], f"{where}.{key}")
    elif isinstance(saved, torch.Tensor):
        assert torch.equal(saved, loaded), f"{where} differs from the uninterrupted job's"
    else:
        assert saved == loaded, where


def resumed_at(dumps: Path, world: int, before: set[str]) -> Path:
    """The one resume at ``world`` ranks since the dumps named ``before`` were there."""
    found = sorted(p for p in dumps.glob(f"resumed_*_w{world}.pt") if p.name not in before)
    assert len(found) == 1, found
    return found[0]


def check_resumed(dumps: Path, resumed: Path, before_world: int) -> int:
    step = int(resumed.name.split("_")[1])
    reference = dumps / f"step_{step}_w{before_world}.pt"
    assert reference.is_file(), sorted(p.name for p in dumps.iterdir())
    assert_same(torch.load(reference, weights_only=True), torch.load(resumed, weights_only=True), resumed.name)
    return step


def test_fsdp_job_loses_a_node_and_gains_one_in_process_with_the_exact_state(cluster, tmp_path):
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    command = [PYTHON, LOOP, "100000", "0.05", str(dumps)]
    agents = [cluster.start_agent(f"node-{i}", nproc=2, min_nodes=1, max_nodes=2, command=command) for i in range(2)]
    wait_until(lambda: any(s >= 5 and ws == 4 for _, s, ws in cluster.steps()), 120, "training at world size 4")
    survivor = agents[0] if agents[0].group_rank() == 0 else agents[1]
    lost = agents[1] if survivor is agents[0] else agents[0]
    pids, starts = survivor.worker_pids(), len(started_lines(survivor))

    before = {p.name for p in dumps.iterdir()}
    killed = time.monotonic()
    lost.kill_node()
    back = wait_until(lambda: cluster.first_step_after(killed, world_size=2), WAIT, "training at world size 2")
    assert survivor.worker_pids() == pids and all(alive(p) for p in pids), survivor.text()[-3000:]
    assert len(started_lines(survivor)) == starts, survivor.text()[-3000:]
    assert "resumed from the in-memory shards" in survivor.text(), survivor.text()[-3000:]
    first = resumed_at(dumps, 2, before)
    held = check_resumed(dumps, first, 4)
    assert back[1] == held + 1
    last_before = max(s for t, s, ws in cluster.steps() if t < killed)
    assert held >= last_before, (held, last_before)  # each rank's copy is on the next node before a step ends
    print(f"kill -9 -> a step at world size 2 in {back[0] - killed:.2f} s, {last_before - held} completed steps lost")

    before = {p.name for p in dumps.iterdir()}
    joined = time.monotonic()
    cluster.start_agent("node-2", nproc=2, min_nodes=1, max_nodes=2, command=command)
    wait_until(lambda: cluster.first_step_after(joined, world_size=4), WAIT, "training at world size 4 again")
    assert survivor.worker_pids() == pids, survivor.text()[-3000:]
    check_resumed(dumps, resumed_at(dumps, 4, before), 2)
    assert "Traceback" not in survivor.text(), survivor.text()[-3000:]


def test_hsdp_job_loses_a_replica_and_recovers_it_from_the_other_in_process(cluster, tmp_path):
    """HSDP: a 2-D mesh, one replica per node, each sharded over its node's 2 workers. The
    replicas hold the same pieces, so no snapshot crosses to the other node (each node keeps
    only its own ranks' files: half the memory, no traffic). A node lost is a replica lost:
    the survivors re-form a 1 x 2 mesh from their own state, kept as it is when the group
    re-forms, so no completed step is lost, whenever the kill lands. By default such a job
    snapshots every 10th step only (the live replica covers a node lost between them)."""
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    command = [PYTHON, LOOP, "100000", "0.05", str(dumps), "hsdp"]
    agents = [cluster.start_agent(f"node-{i}", nproc=2, min_nodes=1, max_nodes=2, command=command) for i in range(2)]
    wait_until(lambda: any(s >= 12 and ws == 4 for _, s, ws in cluster.steps()), 120, "training at world size 4")
    survivor = agents[0] if agents[0].group_rank() == 0 else agents[1]
    lost = agents[1] if survivor is agents[0] else agents[0]
    ranks = {2 * survivor.group_rank() + i for i in range(2)}
    files = sharded_files(cluster, survivor.node_id)
    assert files and {int(name.split("-k")[1].split("-")[0]) for name in files} == ranks, files
    assert all((int(name.split("-s")[1].split("-")[0]) + 1) % 10 == 0 for name in files), files  # every 10th step

    pids, before = survivor.worker_pids(), {p.name for p in dumps.iterdir()}
    killed = time.monotonic()
    lost.kill_node()
    back = wait_until(lambda: cluster.first_step_after(killed, world_size=2), WAIT, "training at world size 2")
    assert survivor.worker_pids() == pids, survivor.text()[-3000:]
    assert "resumed from the in-memory shards" in survivor.text(), survivor.text()[-3000:]
    held = check_resumed(dumps, resumed_at(dumps, 2, before), 4)
    last_before = max(s for t, s, ws in cluster.steps() if t < killed)
    assert held >= last_before, (held, last_before)  # the survivors keep their state as it is: nothing to lose
    print(f"kill -9 -> a step at world size 2 in {back[0] - killed:.2f} s, {last_before - held} completed steps lost")


def sharded_files(cluster: Any, node_id: str) -> list[str]:
    """The names of the rank files of a world of 4 one node keeps in memory."""
    where = snapshots_of(cluster.job_id, cluster.workdir / "elastic-agent-logs") / node_id / SUBDIR
    return sorted(p.name for p in where.glob("shard-*-of4"))
