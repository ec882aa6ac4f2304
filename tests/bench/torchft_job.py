"""The benchmark's job (docs/examples/train_ddp.py's model, data and pacing) written for torchft
0.2.0, as its own examples/train_ddp.py is: one replica group per node, a Manager that joins a
quorum at the Lighthouse on every step, torchft's optimizer wrapper (commits a step only when
every participant's step succeeded), gloo.

The gradients are averaged with ``manager.allreduce(grad).wait()`` (torchft's fault-tolerant
collective: an error is recorded, the step is not committed). torchft's own
``DistributedDataParallel`` wrapper (``--wrapper ddp``) crashes every survivor when a peer dies
in the middle of the gradient all-reduce: its comm hook asserts on the future of the failed
work (``torchft/ddp.py``: ``assert fut._fut`` -> AssertionError, torchft 0.2.0, seen here on a
SIGTERM of a peer), so the benchmark does not use it.

    TORCHFT_LIGHTHOUSE=http://127.0.0.1:PORT REPLICA_GROUP_ID=3 \\
        torchrun --standalone --nproc-per-node 1 tests/bench/torchft_job.py [--step-time 0.1]

Run by torchft's own environment (tests/bench/torchft_launch.py), so it imports nothing of
ours. A committed step prints ``step S world_size W replica_rank R loss L`` (the lines the
benchmark times, as train_ddp.py prints them); a step the quorum did not commit prints nothing.
A new replica group heals from a live peer's memory (torchft's checkpoint transport), never
from disk.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
from torchft import DistributedDataParallel, Manager, Optimizer, ProcessGroupGloo

FEATURES = 8
TRUE_WEIGHT = torch.arange(FEATURES, dtype=torch.float32) / FEATURES
TRUE_BIAS = 0.5


def batch(step: int, rank: int, world_size: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(size, FEATURES, generator=generator)
    y = x @ TRUE_WEIGHT + TRUE_BIAS + 0.01 * torch.randn(size, generator=generator)
    return x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-time", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--min-replicas", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0, help="collective and quorum timeout, seconds")
    parser.add_argument("--wrapper", choices=("allreduce", "ddp"), default="allreduce")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torch.nn.Linear(FEATURES, 1)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)

    def state_dict() -> dict:
        return {"model": model.state_dict(), "optim": inner.state_dict()}

    def load_state_dict(state: dict) -> None:
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["optim"])

    timeout = timedelta(seconds=args.timeout)
    manager = Manager(pg=ProcessGroupGloo(timeout=timeout), min_replica_size=args.min_replicas,
                      load_state_dict=load_state_dict, state_dict=state_dict,
                      replica_id=f"bench_{os.environ['REPLICA_GROUP_ID']}", hostname="127.0.0.1",
                      timeout=timeout, quorum_timeout=timedelta(seconds=60), connect_timeout=timeout)
    ddp = DistributedDataParallel(manager, model) if args.wrapper == "ddp" else model
    optimizer = Optimizer(manager, inner)
    while True:
        began = time.monotonic()
        optimizer.zero_grad()  # starts this step's quorum
        manager.wait_quorum()
        step, world = manager.current_step(), max(1, manager.num_participants())
        rank = manager.participating_rank()
        x, y = batch(step, rank or 0, world, args.batch_size)
        loss = torch.nn.functional.mse_loss(ddp(x).squeeze(-1), y)
        loss.backward()
        if args.wrapper == "allreduce":
            for p in model.parameters():
                manager.allreduce(p.grad).wait()  # False on error: the step is then not committed
        optimizer.step()  # commits only if every participant's step succeeded
        if manager.current_step() > step:
            print(f"step {step} world_size {world} replica_rank {rank} loss {loss.item():.3f}", flush=True)
        time.sleep(max(0.0, args.step_time - (time.monotonic() - began)))


if __name__ == "__main__":
    main()
