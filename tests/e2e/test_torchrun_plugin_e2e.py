"""End-to-end: real ``torchrun`` processes on ``--rdzv-backend etcd-v3`` (rendezvous/torchrun/plugin.py),
one real etcd, gloo workers on 127.0.0.1.

The node whose torchrun hosts global rank 0 (group rank 0: with c10d, the node whose agent
holds the rendezvous store) is killed with ``kill -9`` of its process group, its workers
with it, as when the machine goes: the job goes on at 2 nodes; a 4th node joins and the job
grows; then every rank stops at one agreed step and every torchrun exits 0, and etcd records
the job as succeeded. Every process is stopped by its own pid or process group (the
harness's Cluster), and the cluster's temporary directory is removed.
"""

from __future__ import annotations

import sys
import time

import pytest

from rendezvous.etcd.store import EtcdStore
from rendezvous.settings import Settings
from rendezvous.state import JobStatus, Outcome
from tests.e2e.harness import Cluster, wait_until

pytestmark = pytest.mark.e2e

# A CPU training loop that runs until a stop file appears: the ranks agree on the step to
# stop at (an all-reduce of "seen it"), so every torchrun ends with its workers exited 0.
TRAIN_UNTIL_STOP = '''\
import os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=timedelta(seconds=30))
rank, world = dist.get_rank(), dist.get_world_size()
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
step = 0
while True:
    began = time.monotonic()
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    stop = torch.tensor([float(os.path.exists(sys.argv[1]))])
    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"step {step} world_size {world}", flush=True)
    if stop.item():
        break
    step += 1
    time.sleep(max(0.0, 0.1 - (time.monotonic() - began)))  # pacing: a step is ~0.1 s
dist.barrier()
del model
dist.destroy_process_group()
'''


def job_status(cluster: Cluster) -> JobStatus | None:
    store = EtcdStore(cluster.endpoints)
    try:
        kv, _ = store.get(Settings(job_id=cluster.job_id, min_nodes=1, max_nodes=1).status_key)
        return JobStatus.decode(kv.key, kv.value) if kv is not None else None
    finally:
        store.close()


def test_torchrun_on_etcd_v3_survives_the_loss_of_rank_0_and_grows(cluster: Cluster) -> None:
    script, stop = cluster.workdir / "train_until_stop.py", cluster.workdir / "STOP"
    script.write_text(TRAIN_UNTIL_STOP)
    command = [sys.executable, str(script), str(stop)]
    # A last call long enough for three torchruns importing torch on two cores to meet in round 1.
    start = lambda name: cluster.start_torchrun(name, command=command, backend="etcd-v3",  # noqa: E731
                                                rdzv_conf="last_call=1.5")

    t0 = time.monotonic()
    nodes = [start(f"node-{i}") for i in range(3)]
    wait_until(lambda: cluster.first_step_after(t0, world_size=3), 90, "training at world size 3")

    rank0 = max(nodes, key=lambda n: n.last_step_at())  # the torchrun whose agent hosts (global and group) rank 0
    at = time.monotonic()
    rank0.kill_node(with_workers=True)
    resumed = wait_until(lambda: cluster.first_step_after(at, world_size=2), 60, "training resumed at 2 nodes")
    survivors = [n for n in nodes if n is not rank0]
    assert all(n.proc.poll() is None for n in survivors), [n.text()[-1500:] for n in survivors]

    at = time.monotonic()
    fourth = start("node-3")
    grown = wait_until(lambda: cluster.first_step_after(at, world_size=3), 90, "training at 3 nodes again")
    assert grown[0] > resumed[0]

    stop.touch()
    for node in [*survivors, fourth]:
        assert node.wait(timeout=60) == 0, node.text()[-3000:]
    status = job_status(cluster)
    assert status is not None and status.outcome == Outcome.SUCCEEDED, status
    assert "exit barrier" in status.reason
