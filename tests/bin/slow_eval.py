"""Worker: an ``el.run`` job whose global rank 0 pauses once, alone, as an evaluation or a
long save would, while the other ranks wait in the step's gradient all-reduce.

Args: STEPS PAUSE_AT PAUSE_SECONDS. Rank 0 prints ``pausing at step K`` before its pause,
``step N world_size W`` after each step and ``done`` at the end. The script forms no process
group itself: ``el.run`` does, with torch's default timeout (none passed)."""

import sys
import time

import torch
import torch.distributed as dist

from agent.worker import Elastic

steps, pause_at, pause_s = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
paused = False

torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
el = Elastic(checkpoint_every=0)


def train_step(step: int, ddp: torch.nn.Module) -> None:
    global paused
    rank = dist.get_rank()
    if rank == 0 and step == pause_at and not paused:  # once: in process, the worker is never restarted
        paused = True
        print(f"pausing at step {step}", flush=True)
        time.sleep(pause_s)
    generator = torch.Generator().manual_seed(step * 100 + rank)
    x = torch.randn(8, 4, generator=generator)
    loss = ddp(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if rank == 0:
        print(f"step {step} world_size {dist.get_world_size()}", flush=True)


el.run(train_step, model=model, optimizer=optimizer, steps=steps)
if dist.get_rank() == 0:
    print("done", flush=True)
dist.barrier()  # see docs/examples/train_ddp.py: a clean gloo teardown
dist.destroy_process_group()
