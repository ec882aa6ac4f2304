"""A plain DDP script that handles SIGTERM the way Lightning and many user scripts do: the
handler prints a line and exits. No agent helper, no checkpoint: it starts from step 0 each run.

A rank blocked in a collective a lost peer broke never returns to the interpreter, so its
handler cannot run: only SIGKILL stops it. The agent's --abort-timeout bounds that wait after
an unplanned loss (tests/e2e/test_abort_timeout_e2e.py, the bench's freeze_handler row).

Prints ``step N world_size W`` on global rank 0 after each step (~--step-time seconds).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def on_sigterm(_signum: int, _frame: object) -> None:
    print(f"rank {dist.get_rank()}: SIGTERM received, exiting", flush=True)
    sys.exit(143)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument("--step-time", type=float, default=0.1)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, on_sigterm)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(args.steps):
        began = time.monotonic()
        x = torch.randn(16, 8)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()  # the all-reduce a frozen peer leaves hanging
        optimizer.step()
        if rank == 0:
            print(f"step {step} world_size {world} loss {loss.item():.4f}", flush=True)
        time.sleep(max(0.0, args.step_time - (time.monotonic() - began)))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
