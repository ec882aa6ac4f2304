"""``make bench-fsdp``: the disk-checkpoint stall of an FSDP2 job, asynchronous (the helper) against
a synchronous DCP save (what a torchrun + DCP user does today), and the step time.

Two ranks on this machine (gloo, CPU), a stack of ``Linear`` layers each wrapped in
``fully_shard`` (~100M parameters by default) with Adam. Each rank measures, and the table
shows the slower rank's value of each repetition, as medians:

- step: one training step (forward, backward, Adam), no checkpoint in flight;
- step with a save in flight: a step while the previous asynchronous save writes;
- async stall: what the training waits for an asynchronous save: the ``el.save(step, state,
  wait=False)`` call (the copy of the small unsharded tensors, the start of the background
  copy of this rank's shards, the wait for the previous save, long finished by then) plus the
  wait in the next optimizer step for the background copy to finish (both also shown apart);
- async total: from that call until the checkpoint is committed (manifest written);
- sync DCP save: ``dcp.save`` of the same state into a fresh directory.

Usage: ``python -m tests.bench.fsdp_bench [--layers 24 --width 2048 --repeat 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp import fully_shard

from agent.worker import Elastic

WORLD = 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16, help="per-rank batch (default 16)")
    parser.add_argument("--repeat", type=int, default=5, help="saves of each kind (default 5)")
    parser.add_argument("--gap", type=int, default=3, help="training steps between two saves (default 3)")
    return parser.parse_args()


def worker(rank: int, args: argparse.Namespace, workdir: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    params = sum(p.full_tensor().numel() if hasattr(p, "full_tensor") else p.numel() for p in model.parameters())

    def train_step(step: int) -> float:
        x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(step * WORLD + rank))
        t = time.perf_counter()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    def state() -> dict:
        m, o = get_state_dict(model, opt)
        return {"model": m, "opt": o}

    el = Elastic(Path(workdir) / "ckpt", keep_last=1)
    rows: dict[str, list[float]] = {"step": [], "step with a save in flight": [], "async stall": [],
                                    "  of it: the save call": [], "  of it: the next optimizer step": [],
                                    "async total (to manifest)": [], "sync DCP save": []}
    waits: list[float] = []
    step = 0
    train_step(step)  # warm up: lazy initialisation, first allocation of the optimizer state
    step += 1
    for i in range(args.repeat):
        for _ in range(args.gap):
            dist.barrier()
            rows["step"].append(train_step(step))
            step += 1
        dist.barrier()
        t = time.perf_counter()
        el.save(step, state(), wait=False)
        rows["  of it: the save call"].append(time.perf_counter() - t)
        saver = el._sharded
        staged = type(saver).staged.__get__(saver)

        def timed_staged() -> None:  # the optimizer pre-step hook's wait for the copy
            begin = time.perf_counter()
            staged()
            waits.append(time.perf_counter() - begin)

        saver.staged = timed_staged
        waits.clear()
        rows["step with a save in flight"].append(train_step(step))
        del saver.staged
        rows["  of it: the next optimizer step"].append(waits[0] if waits else 0.0)
        rows["async stall"].append(rows["  of it: the save call"][-1] + rows["  of it: the next optimizer step"][-1])
        step += 1
        el._sharded.wait()  # the rest of the async save, for its total time (not a stall in real use)
        rows["async total (to manifest)"].append(time.perf_counter() - t)
        dist.barrier()
        t = time.perf_counter()
        dcp.save(state(), checkpoint_id=Path(workdir) / f"sync-{i}", process_group=el._sharded.group())
        rows["sync DCP save"].append(time.perf_counter() - t)
    gathered: list = [None] * WORLD
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        worst = {k: [max(g[k][j] for g in gathered) for j in range(len(rows[k]))] for k in rows}
        torch.save({"rows": worst, "params": params}, out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as workdir:
        out = os.path.join(workdir, "result.pt")
        mp.spawn(worker, args=(args, workdir, out), nprocs=WORLD, join=True)
        result = torch.load(out)
    rows, params = result["rows"], result["params"]
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"FSDP2, {WORLD} ranks (gloo, CPU), {params / 1e6:.0f}M parameters + Adam "
          f"({params * 12 / 2**30:.2f} GiB of state), {args.repeat} saves of each kind, medians "
          f"(slower rank of each repetition)")
    print(f"{'':34s} {'median s':>9s} {'min s':>7s} {'max s':>7s}   n")
    for key, values in rows.items():
        print(f"{key:34s} {med[key]:9.3f} {min(values):7.3f} {max(values):7.3f} {len(values):3d}")
    ratio = med["async stall"] / med["sync DCP save"]
    print(f"async stall / sync DCP save: {ratio * 100:.1f} % (target <= 10 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
