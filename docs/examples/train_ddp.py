"""A small DDP training script on the agent.worker helper: linear regression on synthetic data.

Runs unchanged under the agent and under plain torchrun:

    torchrun --standalone --nproc-per-node 2 docs/examples/train_ddp.py --steps 20
    elastic-agent start ... --checkpoint-dir /shared/ckpt -- python docs/examples/train_ddp.py --steps 1000

It is an example for tests as much as for people: a step is padded with a sleep to about
``--step-time`` seconds (0.1 by default) so that tests can act between steps, and
``--fail-at-step`` / ``--hang-at-step`` inject faults.

The data of step ``s`` is drawn from a generator seeded with ``s`` and split between the
ranks, so a run is deterministic whatever the world size and however often it was resumed.

Output on global rank 0: first ``starting from step 0`` or ``resumed from step N (checkpoint
of step N-1)`` (N is the first step this run trains), then one line per completed step,
``step 12 world_size 6 loss 0.123``, and ``done`` at the end. Exit codes: 0 done, 75 drained
(stopped at a step boundary on the agent's request, checkpoint written), 1 failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from agent.worker import Elastic

FEATURES = 8
TRUE_WEIGHT = torch.arange(FEATURES, dtype=torch.float32) / FEATURES
TRUE_BIAS = 0.5
HANG_LIMIT_S = 3600.0  # a simulated hang still ends, in case nothing kills it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="total number of steps (default 20)")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="checkpoint every N steps (0: only on drain)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="where checkpoints go (default: $ELASTIC_AGENT_CHECKPOINT_DIR; none: no checkpoints)")
    parser.add_argument("--keep-last", type=int, default=3, help="complete checkpoints to keep (default 3)")
    parser.add_argument("--batch-size", type=int, default=48, help="global batch size (default 48)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--step-time", type=float, default=0.1, help="pad each step to this many seconds (default 0.1)")
    parser.add_argument("--timeout", type=float, default=60.0, help="process group timeout, seconds (default 60)")
    parser.add_argument("--fail-at-step", type=int, default=None,
                        help="test fault: global rank 0 exits 1 at the start of step K, once "
                             "(once per checkpoint dir when there is one, else only when "
                             "TORCHELASTIC_RESTART_COUNT is 0)")
    parser.add_argument("--inprocess", action="store_true",
                        help="let the helper run the loop (Elastic.run): on a membership change the workers "
                             "stay alive, re-form the process group and keep the state in memory")
    parser.add_argument("--hang-at-step", type=int, default=None,
                        help="test fault: global rank 0 stops reporting progress and sleeps at the "
                             "start of step K, once (same rule as --fail-at-step)")
    return parser.parse_args(argv)


def first_time(fault: str, step: int, checkpoint_dir: Path | None) -> bool:
    """True the first time this fault fires: a marker in the checkpoint directory (shared by
    every attempt of the job) or, without one, the torchelastic restart count."""
    if checkpoint_dir is None:
        return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    try:
        (checkpoint_dir / f"fault-{fault}-{step}.marker").open("x").close()
    except FileExistsError:
        return False
    return True


def batch(step: int, rank: int, world_size: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(size, FEATURES, generator=generator)
    y = x @ TRUE_WEIGHT + TRUE_BIAS + 0.01 * torch.randn(size, generator=generator)
    return x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]


def inject_faults(args: argparse.Namespace, step: int, rank: int, checkpoint_dir: Path | None) -> None:
    if rank == 0 and step == args.fail_at_step and first_time("fail", step, checkpoint_dir):
        print(f"injected failure at step {step}", file=sys.stderr, flush=True)
        os._exit(1)  # like a crash: no cleanup, no checkpoint
    if rank == 0 and step == args.hang_at_step and first_time("hang", step, checkpoint_dir):
        print(f"injected hang at step {step}", file=sys.stderr, flush=True)
        threading.Event().wait(HANG_LIMIT_S)
        os._exit(1)


def one_step(args: argparse.Namespace, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             device: torch.device, checkpoint_dir: Path | None) -> None:
    """One training step, the same in both loops: forward, backward, update, the loss line
    on global rank 0, then the pacing sleep (see the docstring)."""
    began = time.monotonic()
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    inject_faults(args, step, rank, checkpoint_dir)
    x, y = batch(step, rank, world_size, args.batch_size)
    loss = torch.nn.functional.mse_loss(model(x.to(device)).squeeze(-1), y.to(device))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    reported = loss.detach()
    if distributed:
        dist.all_reduce(reported)
    if rank == 0:
        print(f"step {step} world_size {world_size} loss {reported.item() / world_size:.3f}", flush=True)
    time.sleep(max(0.0, args.step_time - (time.monotonic() - began)))


def run_in_process(args: argparse.Namespace, el: Elastic, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """The same training, with the loop inside the helper: a membership change re-forms the
    process group in this process, and the state every survivor holds carries over."""

    def train_step(step: int, ddp: torch.nn.Module) -> None:
        one_step(args, step, ddp, optimizer, device, el.checkpoint_dir)

    el.run(train_step, model=model, optimizer=optimizer, steps=args.steps)
    if dist.get_rank() == 0:
        print("done", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://",
                                timeout=timedelta(seconds=args.timeout))
    rank = dist.get_rank() if distributed else 0

    el = Elastic(args.checkpoint_dir, checkpoint_every=args.checkpoint_every, keep_last=args.keep_last)
    torch.manual_seed(0)
    model = torch.nn.Linear(FEATURES, 1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    if args.inprocess:
        return run_in_process(args, el, model, optimizer, device)
    start, state = el.load(default=None, map_location=device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    if rank == 0:
        print(f"resumed from step {start} (checkpoint of step {start - 1})" if start else "starting from step 0",
              flush=True)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None) if distributed else model

    def snapshot() -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    for step in range(start, args.steps):
        one_step(args, step, ddp, optimizer, device, el.checkpoint_dir)
        if el.step(step, snapshot):
            if rank == 0:
                print(f"drained at step {step}", flush=True)
            el.exit_drained()
    el.finish()
    if rank == 0:
        print("done", flush=True)
    if distributed:
        # Everyone done communicating, then DDP goes before its process group: otherwise gloo
        # sometimes aborts at exit in torch 2.13 ("terminate called without an active exception").
        dist.barrier()
        del ddp
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
