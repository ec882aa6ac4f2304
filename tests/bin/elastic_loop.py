"""Worker: a tiny training loop on the agent.worker helper (gloo, CPU, no model).

Args: TOTAL_STEPS STEP_SECONDS [CHECKPOINT_EVERY]. Prints ``resumed START`` once, then
``step N`` per step; on a drain prints ``drained N`` and exits 75.
"""

import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from agent.worker import Elastic

total, step_seconds = int(sys.argv[1]), float(sys.argv[2])
every = int(sys.argv[3]) if len(sys.argv) > 3 else 0

dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=30))
el = Elastic(checkpoint_every=every, keep_last=2)
start, state = el.load(default=lambda: {"sum": torch.zeros(1)})
print(f"resumed {start}", flush=True)
for step in range(start, total):
    value = torch.tensor([float(step)])
    dist.all_reduce(value)  # stands in for the gradient all-reduce
    state["sum"] += value
    time.sleep(step_seconds)
    print(f"step {step}", flush=True)
    if el.step(step, lambda: {"sum": state["sum"].clone(), "step": step}):
        print(f"drained {step}", flush=True)
        el.exit_drained()
el.finish()
print(f"done sum {state['sum'].item():g}", flush=True)
dist.barrier()  # see docs/examples/train_ddp.py: a clean gloo teardown
dist.destroy_process_group()
