"""Worker: a small FSDP2 ``el.run`` job (gloo, CPU) for end-to-end tests of sharded recovery in
process, with the helper's INFO log shown.

Args: STEPS STEP_SECONDS DUMP_DIR [hsdp]. Global rank 0 prints ``step N world_size W`` after
each step. After every step the full (gathered) model and optimizer state go to
DUMP_DIR/step_N_wW.pt; at the first step after a re-form, the state the job resumed from goes
to DUMP_DIR/resumed_N_wW.pt (N: the step it holds), before any training: a test compares the
two. ``hsdp``: a 2-D mesh (replicate x shard, one replica per node)."""

import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from agent.worker import Elastic

handler = logging.StreamHandler()
handler.setFormatter(logging.Formatter("pid %(process)d %(name)s %(levelname)s: %(message)s"))
logging.getLogger("agent.worker").addHandler(handler)
logging.getLogger("agent.worker").setLevel(logging.INFO)

steps, step_s, dump_dir = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
hsdp = len(sys.argv) > 4 and sys.argv[4] == "hsdp"


def build() -> nn.Module:
    """The same model (seed 0), sharded on the current default group."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 20), nn.ReLU(), nn.Linear(20, 4))
    mesh = None
    if hsdp:
        local = int(os.environ["LOCAL_WORLD_SIZE"])
        mesh = init_device_mesh("cpu", (dist.get_world_size() // local, local), mesh_dim_names=("replicate", "shard"))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(value):
    if hasattr(value, "full_tensor"):
        return value.full_tensor().detach().clone()
    if isinstance(value, dict):
        return {k: full(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [full(v) for v in value]
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def dump(model: nn.Module, name: str) -> None:
    """Collective: every rank gathers; global rank 0 writes."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = full({"model": model_state, "optimizer": optim_state["state"]})
    if dist.get_rank() == 0:
        tmp = dump_dir / f".{name}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, dump_dir / name)


dist.init_process_group("gloo")
model = build()
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
el = Elastic(checkpoint_every=0)
last = {"step": -1, "model": model}


def train_step(step: int, m: nn.Module) -> None:
    began = time.monotonic()
    rank, world = dist.get_rank(), dist.get_world_size()
    if m is not last["model"] or step != last["step"] + 1:
        dump(m, f"resumed_{step - 1}_w{world}.pt")
    last["model"] = m
    generator = torch.Generator().manual_seed(step)
    x, y = torch.randn(24, 16, generator=generator), torch.randn(24, 4, generator=generator)
    loss = (m(x[rank::world]) - y[rank::world]).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    dump(m, f"step_{step}_w{world}.pt")
    last["step"] = step
    if rank == 0:
        print(f"step {step} world_size {world}", flush=True)
    time.sleep(max(0.0, step_s - (time.monotonic() - began)))


el.run(train_step, model=model, optimizer=optimizer, steps=steps, build_model=build)
dist.barrier()
dist.destroy_process_group()
