"""``make bench-fsdp``, second table: in-memory snapshots of an FSDP2 job (agent.worker.sharded_memory)
and in-process recovery from them, against what a torchrun + DCP user does.

2 simulated nodes x 2 workers on this machine (gloo, CPU): each node its own snapshot
directory and snapshot ports, a stack of ``Linear`` layers each in ``fully_shard`` with Adam.
Each rank measures; the table shows the slower rank's value, as medians over ``--repeat``:

- step, snapshots off / every step: forward, backward, Adam, plus (on) the snapshot as el.run
  takes it by default at every step: for plain FSDP2 (a peer on the next node) its write and
  push in the optimizer's post-step hook, every rank waiting for all (no step that ended can
  be lost); for HSDP (no push: the twin replica stands for it) a copy behind the next step;
- every step, behind the next (FSDP2 only): the copy of this rank's shards to host memory, then
  its write and push behind the next step's forward and backward, the next optimizer step waiting
  for it (what a script that sets a cadence gets; the step in flight is at risk);
- lose a node, state back: node 1's ranks are gone; node 0's ranks form a new group of 2
  in process, rebuild the model on it and fill their shards from their node's own files and
  the copies node 1 pushed there; the next step can start. (Failure detection by the agents is not
  in it: tests/e2e/test_sharded_inprocess_e2e.py shows it end to end; steps lost there is the
  snapshot in flight at most, here 0 by construction: the loss lands between steps);
- a node joins: 4 ranks again, the newcomers (their memory wiped) fetch their shards over
  the authenticated port from node 0;
- host memory: bytes of rank files one node keeps (its ranks' and its peer's, 2 steps each);
- torchrun + DCP: a synchronous ``dcp.save`` (the stall), and a restart from it: ``dcp.load``
  onto 2 ranks, plus a fresh interpreter importing torch (the process restart).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from agent.worker import Elastic
from agent.worker import snapshot_wire as wire
from agent.worker.held import HeldState
from agent.worker.shard_store import SUBDIR
from agent.worker.sharded_memory import ShardedMemory, state_of

WORLD, LOCAL = 4, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16, help="per-rank batch (default 16)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each kind per repetition (default 4)")
    parser.add_argument("--repeat", type=int, default=2, help="losses and joins (default 2)")
    parser.add_argument("--every", type=int, default=10, help="a sparser snapshot cadence to compare (default 10)")
    parser.add_argument("--hsdp", action="store_true",
                        help="HSDP: a replica per node, sharded over its ranks (snapshots then stay on their node)")
    parser.add_argument("--verbose", action="store_true", help="the helper's INFO log (where a recovery's time goes)")
    return parser.parse_args(argv)


def form(workdir: str, name: str, rank: int, world: int) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{workdir}/{name}", rank=rank, world_size=world)


def worker(rank: int, args: argparse.Namespace, workdir: str, out: str, key: bytes, shm: str) -> None:
    torch.set_num_threads(1)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format=f"rank {rank} %(name)s: %(message)s")
    node = Path(shm) / f"node-{rank // LOCAL}"
    wire.write_key(node, key)
    form(workdir, "store-1", rank, WORLD)

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
        world = dist.get_world_size()
        mesh = (init_device_mesh("cpu", (world // LOCAL, LOCAL), mesh_dim_names=("replicate", "shard"))
                if args.hsdp and world > LOCAL else None)
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    model = build()
    held = HeldState(model, torch.optim.Adam(model.parameters(), lr=1e-4))
    held.sharded = state_of
    memory = ShardedMemory(node, "bench", 1, build, node=node.name, local_rank=rank % LOCAL, local_world=LOCAL,
                           round_number=1)
    memory.serve("127.0.0.1")
    el = Elastic(None)
    memory.agree(held, el, 1, [])
    params = sum(p.full_tensor().numel() for p in held.model.parameters())
    rows: dict[str, list[float]] = {k: [] for k in (
        "step, snapshots off", "step, snapshot every step", "step, every step, behind the next",
        f"step, snapshots off (mean of {args.every})", f"step, snapshot every {args.every} (mean)",
        "stall: made and pushed in the step", "stall behind: state_dict + copy", "stall behind: wait for the last",
        "lose a node: state back", "a node joins: state back", "torchrun+DCP: sync save",
        "torchrun+DCP: load on 2 ranks")}
    step, round_number = 0, 1

    def train(snapshot: bool | int | str) -> float:
        """One step: snapshots off (False), every step as el.run does by default (True), every
        step behind the next ("behind"), or every ``snapshot``-th step behind the next."""
        nonlocal step
        memory.sync = snapshot is True and memory.peer is not None
        dist.barrier()
        t = time.perf_counter()
        x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(step * WORLD + rank))
        held.model(x).pow(2).mean().backward()
        w = time.perf_counter()
        memory.before_update()
        waited = time.perf_counter() - w
        held.optimizer.step()
        if memory.sync:
            c = time.perf_counter()
            memory.after_update(step, round_number, held)  # el.run's optimizer post-step hook
            made = time.perf_counter() - c
        held.optimizer.zero_grad()
        held.completed = step
        if snapshot in (True, "behind") or (type(snapshot) is int and (step + 1) % snapshot == 0):
            c = time.perf_counter()
            memory.after_step(step, round_number, held.state_dict())
            if memory.sync:
                rows["stall: made and pushed in the step"].append(made + time.perf_counter() - c)
            elif snapshot in (True, "behind"):
                rows["stall behind: state_dict + copy"].append(time.perf_counter() - c)
                rows["stall behind: wait for the last"].append(waited)
        step += 1
        return time.perf_counter() - t

    train(False)  # warm up
    memory_bytes = 0
    for i in range(args.repeat):
        rows["step, snapshots off"] += [train(False) for _ in range(args.steps)]
        rows["step, snapshot every step"] += [train(True) for _ in range(args.steps)]
        if not args.hsdp:
            rows["step, every step, behind the next"] += [train("behind") for _ in range(args.steps)]
        rows[f"step, snapshots off (mean of {args.every})"].append(
            statistics.mean(train(False) for _ in range(args.every)))
        rows[f"step, snapshot every {args.every} (mean)"].append(
            statistics.mean(train(args.every) for _ in range(args.every)))
        memory.before_update()
        dist.barrier()
        memory_bytes = sum(p.stat().st_size for p in (node / SUBDIR).glob("shard-*"))
        t = time.perf_counter()
        m, o = get_state_dict(held.model, held.optimizer)
        dcp.save({"model": m, "optim": o}, checkpoint_id=Path(workdir) / f"dcp-{i}")
        rows["torchrun+DCP: sync save"].append(time.perf_counter() - t)
        dist.barrier()
        round_number += 1  # node 1 is lost: node 0 goes on alone
        t = time.perf_counter()
        if rank < LOCAL:
            form(workdir, f"store-{round_number}", rank, LOCAL)
            memory.agree(held, el, round_number, [])
            rows["lose a node: state back"].append(time.perf_counter() - t)
            train(True)
            t = time.perf_counter()
            m, o = get_state_dict(held.model, held.optimizer)
            state = {"model": m, "optim": o}
            dcp.load(state, checkpoint_id=Path(workdir) / f"dcp-{i}")
            set_state_dict(held.model, held.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            rows["torchrun+DCP: load on 2 ranks"].append(time.perf_counter() - t)
            memory.before_update()
        else:  # a new node joins: nothing in memory
            shutil.rmtree(node / SUBDIR, ignore_errors=True)
            held.completed = -1
        round_number += 1
        form(workdir, f"store-{round_number}", rank, WORLD)
        t = time.perf_counter()
        memory.agree(held, el, round_number, [])
        rows["a node joins: state back"].append(time.perf_counter() - t)
        train(True)
        memory.before_update()
    gathered: list = [None] * WORLD
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        worst = {k: [max(g[k][j] for g in gathered if len(g[k]) > j) for j in range(len(rows[k]))] for k in rows}
        torch.save({"rows": worst, "params": params, "memory": memory_bytes}, out)
    dist.barrier()
    dist.destroy_process_group()


def restart_seconds() -> float:
    """A process restart's fixed cost: a fresh interpreter importing torch.distributed."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, torch.distributed, torch.distributed.checkpoint"], check=True)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shm_root = "/dev/shm" if os.path.isdir("/dev/shm") else None  # where the agent keeps snapshots
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-memory-") as workdir, \
            tempfile.TemporaryDirectory(prefix="bench-fsdp-memory-", dir=shm_root) as shm:
        out = os.path.join(workdir, "result.pt")
        mp.spawn(worker, args=(args, workdir, out, os.urandom(32), shm), nprocs=WORLD, join=True)
        result = torch.load(out)
    restart = statistics.median(restart_seconds() for _ in range(3))
    rows, params = result["rows"], result["params"]
    med = {k: statistics.median(v) for k, v in rows.items() if v}  # a row this mesh has none of: left out
    print(f"\n{'HSDP (a replica per node)' if args.hsdp else 'FSDP2'} in memory, 2 nodes x {LOCAL} workers (gloo, CPU), {params / 1e6:.0f}M parameters + Adam, "
          f"medians (slower rank of each repetition)")
    print(f"{'':34s} {'median s':>9s} {'min s':>7s} {'max s':>7s}   n")
    for key, median in med.items():
        print(f"{key:34s} {median:9.3f} {min(rows[key]):7.3f} {max(rows[key]):7.3f} {len(rows[key]):3d}")
    off, on = med["step, snapshots off"], med["step, snapshot every step"]
    sparse, sparse_off = med[f"step, snapshot every {args.every} (mean)"], med[f"step, snapshots off (mean of {args.every})"]
    behind = med.get("step, every step, behind the next")
    print(f"snapshot overhead: every step {(on - off) / off * 100:.1f} %"
          + (f" (behind the next step instead: {(behind - off) / off * 100:.1f} %)" if behind else "")
          + f", every {args.every} steps {(sparse - sparse_off) / sparse_off * 100:.1f} % of the step (means of "
          f"{args.every} steps against as many without; target <= 3 % at the default cadence: "
          f"{'every 10th step for HSDP' if args.hsdp else 'every step, made in the step, for FSDP2'})")
    if "stall: made and pushed in the step" in med:
        made = med["stall: made and pushed in the step"]
        print(f"stall of a snapshot made and pushed in the step (copy, crc32, push with its HMAC on both ends, the "
              f"peer's write, every rank waiting for all; this node's own write goes behind): {made:.3f} s, "
              f"{made / off * 100:.1f} % of the step")
    if "stall behind: state_dict + copy" in med:
        stall = med["stall behind: state_dict + copy"] + med["stall behind: wait for the last"]
        print(f"stall of a snapshot behind the next step (state_dict, copy to host, wait for the last write and "
              f"push): {stall:.3f} s, {stall / off * 100:.1f} % of the step; the rest of its overhead is the "
              f"write and push taking CPU from training ({os.cpu_count()} cores here for {WORLD} ranks)")
    print(f"lose a node -> state back (new group of 2, re-shard from memory): "
          f"{med['lose a node: state back']:.2f} s (target <= 2 s); steps lost are not measured here (the loss "
          f"lands between steps): fsdp_agent_bench kills at random points")
    print(f"host memory of rank files per node: {result['memory'] / 2**20:.0f} MiB "
          f"({result['memory'] / (params * 12):.2f} x the whole model + Adam state)")
    print(f"torchrun + DCP after a loss: restart {restart:.2f} s (fresh interpreter) + load "
          f"{med['torchrun+DCP: load on 2 ranks']:.2f} s, plus the steps since its last synchronous save "
          f"(each costing a {med['torchrun+DCP: sync save']:.2f} s stall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
