"""Worker: a small ``el.run`` job (a linear model, gloo) for end-to-end tests of recovery in
process, with the helper's INFO log shown as a user's own ``logging`` setup would.

Args: STEPS STEP_SECONDS [PAUSE_AT PAUSE_SECONDS]. Global rank 0 prints ``step N world_size
W`` after each step and ``done`` at the end; with PAUSE_AT it pauses alone once, before that
step's all-reduce (an evaluation, a long save), printing ``pausing at step K`` first. The
script forms no process group itself: ``el.run`` does, with torch's default timeout."""

import logging
import sys
import time

import torch
import torch.distributed as dist

from agent.worker import Elastic

handler = logging.StreamHandler()
handler.setFormatter(logging.Formatter("pid %(process)d %(name)s %(levelname)s: %(message)s"))
logging.getLogger("agent.worker").addHandler(handler)
logging.getLogger("agent.worker").setLevel(logging.INFO)

steps, step_s = int(sys.argv[1]), float(sys.argv[2])
pause_at, pause_s = (int(sys.argv[3]), float(sys.argv[4])) if len(sys.argv) > 4 else (-1, 0.0)
paused = False

torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
el = Elastic(checkpoint_every=0)


def train_step(step: int, ddp: torch.nn.Module) -> None:
    global paused
    began = time.monotonic()
    rank = dist.get_rank()
    if rank == 0 and step == pause_at and not paused:  # once: in process, the worker is never restarted
        paused = True
        print(f"pausing at step {step}", flush=True)
        time.sleep(pause_s)
    generator = torch.Generator().manual_seed(step * 100 + rank)
    loss = ddp(torch.randn(8, 4, generator=generator)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if rank == 0:
        print(f"step {step} world_size {dist.get_world_size()}", flush=True)
    time.sleep(max(0.0, step_s - (time.monotonic() - began)))


el.run(train_step, model=model, optimizer=optimizer, steps=steps)
if dist.get_rank() == 0:
    print("done", flush=True)
dist.barrier()  # see docs/examples/train_ddp.py: a clean gloo teardown
dist.destroy_process_group()
