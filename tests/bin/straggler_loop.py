"""Worker: a tiny lockstep training loop on the agent.worker helper (gloo, CPU, no model) in
which one node is slow: its steps' own work takes FACTOR times as long.

Args: TOTAL_STEPS STEP_SECONDS SLOW_NODE FACTOR. The work of a step is a sleep of
STEP_SECONDS (times FACTOR on the node whose ELASTIC_AGENT_NODE_ID is SLOW_NODE), reported to
the agent as the step's busy time; an all_reduce per step keeps the nodes in lockstep, so
every node's wall time per step is the slow one's. Global rank 0 prints ``starting from step
0`` or ``resumed from step N``, then ``step N world_size W`` per step; on a drain ``drained
at step N`` (exit 75).
"""

import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from agent.worker import Elastic

total, step_seconds, slow_node, factor = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], float(sys.argv[4])
work = step_seconds * (factor if os.environ.get("ELASTIC_AGENT_NODE_ID") == slow_node else 1.0)

dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=30))
rank, world = dist.get_rank(), dist.get_world_size()
el = Elastic(keep_last=2)
start, state = el.load(default=lambda: {"sum": torch.zeros(1)})
if rank == 0:
    print(f"resumed from step {start}" if start else "starting from step 0", flush=True)
for step in range(start, total):
    began = time.monotonic()
    time.sleep(work)  # the step's own work
    busy = time.monotonic() - began
    value = torch.tensor([float(step)])
    dist.all_reduce(value)  # stands in for the gradient all-reduce: the fast nodes wait here
    state["sum"] += value
    if rank == 0:
        print(f"step {step} world_size {world}", flush=True)
    if el.step(step, lambda: {"sum": state["sum"].clone()}, busy=busy):
        if rank == 0:
            print(f"drained at step {step}", flush=True)
        el.exit_drained()
el.finish()
dist.barrier()
dist.destroy_process_group()
