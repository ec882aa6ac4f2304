"""A sharded (FSDP2) training script on the agent.worker helper: each rank holds only its shards.

    torchrun --standalone --nproc-per-node 2 docs/examples/train_fsdp.py --steps 20
    elastic-agent start ... --checkpoint-dir /shared/ckpt -- python docs/examples/train_fsdp.py --steps 1000

Every ``Linear`` and the whole model are wrapped in ``fully_shard``. The device follows
torchrun's variables: with CUDA, the GPU of ``LOCAL_RANK`` and NCCL, with a gloo side backend
(``cpu:gloo,cuda:nccl``: the asynchronous checkpoint's collectives run on CPU); without, gloo
on CPU. The state goes through ``get_state_dict``/``set_state_dict``: they give the model and
optimizer state as DTensors keyed by parameter name, and initialise the optimizer's state
before its first step so that a resume loads the saved moments into it. The helper sees the
DTensors and saves through torch.distributed.checkpoint: every rank writes its own shards, in
the background; a checkpoint loads at any world size (re-sharded on load).

Two loops, as docs/examples/train_ddp.py has:

- ``--loop step`` (the default): the script's own loop with ``el.load``/``el.step``. A
  membership change restarts the workers, which resume from the latest complete checkpoint.
- ``--loop run``: the helper runs the loop (``el.run``): a membership change re-forms the
  process group inside the running workers. Every rank keeps a snapshot of its own shards in
  host memory and on a peer node (made before ``optimizer.step()`` returns, so a node lost
  costs no step that ended); after a re-form ``build_model`` (``build`` here) shards a new
  model on the new group and the helper fills its shards from those snapshots, re-sharded
  onto the new world size, without reading disk. ``train_step`` uses the model it is given.

Output on global rank 0: ``fsdp: starting at step N, world size W`` (the step loop), a line per
completed step, ``step 12 world_size 2 loss 0.1234`` (printed once every rank has updated its
weights), ``drained at step N`` when the agent drains the job (the step loop; checkpoint
written, exit 75), and ``fsdp: trained N steps, world size W, loss L`` at the end.
``--step-time`` pads each step to that many seconds (the demo paces the job with it).
``--hsdp`` shards over a 2-D mesh instead (HSDP: each node's ranks hold one replica, sharded
among them, replicated across nodes): under ``el.run`` a replica's snapshot then never crosses
to another node (the other replicas hold the same pieces), and a node lost costs no step.

For tests: ``--dump-at STEP`` (repeatable) writes the full (gathered) model and optimizer
state after STEP to ``--dump-dir``/saved_STEP.pt, and ``--dump-loaded`` (the step loop) writes
the state just loaded to ``--dump-dir``/loaded_START.pt, from global rank 0.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from agent.worker import Elastic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="total number of steps (default 20)")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="checkpoint every N steps (0: only on drain)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="where checkpoints go (default: $ELASTIC_AGENT_CHECKPOINT_DIR; none: no checkpoints)")
    parser.add_argument("--keep-last", type=int, default=3, help="complete checkpoints to keep (default 3)")
    parser.add_argument("--width", type=int, default=32, help="hidden width (default 32)")
    parser.add_argument("--batch-size", type=int, default=24, help="global batch size (default 24)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--loop", choices=("step", "run"), default="step",
                        help="step: el.load/el.step, a membership change restarts the workers from the last "
                             "checkpoint (default); run: el.run, the workers re-form in process")
    parser.add_argument("--hsdp", action="store_true",
                        help="HSDP: shard within a node (LOCAL_WORLD_SIZE ranks), replicate across nodes")
    parser.add_argument("--step-time", type=float, default=0.0,
                        help="pad each step to this many seconds (default 0: no padding)")
    parser.add_argument("--dump-dir", default=None, help="test aid: where --dump-at/--dump-loaded write")
    parser.add_argument("--dump-at", type=int, action="append", default=[], help="test aid: dump after this step")
    parser.add_argument("--dump-loaded", action="store_true", help="test aid: dump the state loaded at start")
    args = parser.parse_args(argv)
    if args.dump_loaded and args.loop == "run":
        parser.error("--dump-loaded needs --loop step (el.run loads the state itself)")
    return args


def full(value: Any) -> Any:
    """``value`` with every DTensor gathered to a full tensor (collective: same order on every rank)."""
    if hasattr(value, "full_tensor"):
        return value.full_tensor().detach().cpu().clone()
    if isinstance(value, dict):
        return {k: full(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [full(v) for v in value]
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and "LOCAL_RANK" in os.environ
    if "RANK" in os.environ:
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    else:  # a single process: a one-rank group, so that fully_shard has a mesh
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group(backend="gloo", rank=0, world_size=1)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    def build() -> nn.Module:
        """The model, sharded on the current process group (el.run calls it again after a re-form)."""
        torch.manual_seed(0)  # the same initial model on every rank, whatever the world size
        built = nn.Sequential(nn.Linear(16, args.width), nn.ReLU(), nn.Linear(args.width, args.width), nn.ReLU(),
                              nn.Linear(args.width, 4)).to(device)
        local, world = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), dist.get_world_size()
        mesh = None
        if args.hsdp and world > local and world % local == 0:
            mesh = init_device_mesh(device.type, (world // local, local), mesh_dim_names=("replicate", "shard"))
        for layer in built:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(built, mesh=mesh)
        return built

    model = build()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    def state() -> dict[str, Any]:
        model_state, opt_state = get_state_dict(model, opt)
        return {"model": model_state, "opt": opt_state}

    def dump(name: str, module: nn.Module) -> None:
        model_state, opt_state = get_state_dict(module, opt)
        gathered = full({"model": model_state, "opt": opt_state})
        if dist.get_rank() == 0 and args.dump_dir is not None:
            Path(args.dump_dir).mkdir(parents=True, exist_ok=True)
            torch.save(gathered, Path(args.dump_dir) / name)

    def say(line: str) -> None:
        if dist.get_rank() == 0:
            print(line, flush=True)

    def loaded_at(start: int) -> None:
        """The start line (and, for tests, a dump of the state just loaded)."""
        if args.dump_loaded:
            dump(f"loaded_{start}.pt", model)
        say(f"fsdp: starting at step {start}, world size {dist.get_world_size()}")

    last_loss = [float("nan")]

    def train_step(step: int, module: nn.Module) -> None:
        """One step on the group of the moment (el.run re-forms it; ranks and world size may change)."""
        began = time.monotonic()
        rank, world_size = dist.get_rank(), dist.get_world_size()
        per_rank = args.batch_size // world_size
        g = torch.Generator().manual_seed(step)  # the data of a step does not depend on the resume
        x = torch.randn(args.batch_size, 16, generator=g)[rank * per_rank:(rank + 1) * per_rank].to(device)
        y = x[:, :4].sum(dim=1, keepdim=True).expand(-1, 4)
        loss = nn.functional.mse_loss(module(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        reported = loss.detach().clone()
        dist.all_reduce(reported)  # after the update: a printed step is one every rank completed
        last_loss[0] = reported.item() / world_size
        say(f"step {step} world_size {world_size} loss {last_loss[0]:.4f}")
        if step in args.dump_at:
            dump(f"saved_{step}.pt", module)
        time.sleep(max(0.0, args.step_time - (time.monotonic() - began)))

    el = Elastic(args.checkpoint_dir, checkpoint_every=args.checkpoint_every, keep_last=args.keep_last)
    if args.loop == "run":
        el.run(train_step, model=model, optimizer=opt, steps=args.steps, build_model=build)
    else:
        start, loaded = el.load(default=state)  # the latest complete checkpoint, re-sharded; else state()
        set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["opt"])
        loaded_at(start)
        for step in range(start, args.steps):
            train_step(step, model)
            if el.step(step, state):  # drained: every rank's shards of `step` are saved
                say(f"drained at step {step}")
                el.exit_drained()
        el.finish()
    say(f"fsdp: trained {args.steps} steps, world size {dist.get_world_size()}, loss {last_loss[0]:.4f}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
