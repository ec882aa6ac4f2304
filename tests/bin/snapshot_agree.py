"""One rank of tests/integration/test_snapshot.py: form the gloo group from the environment,
agree on the state the way an in-process worker does when every worker is new, print the
step it resumes after and its weight as JSON. Argument: the checkpoint directory."""

from __future__ import annotations

import json
import logging
import os
import sys

import torch
import torch.distributed as dist

from agent.worker import Elastic, snapshot
from agent.worker.held import HeldState

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s: %(message)s")
dist.init_process_group("gloo", init_method="env://")
model = torch.nn.Linear(1, 1, bias=False)
torch.nn.init.zeros_(model.weight)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
el = Elastic(sys.argv[1])
snaps = snapshot.from_env(os.environ, every=1)
if snaps is not None:
    snaps.serve("127.0.0.1")
held = HeldState(model, optimizer)
if os.environ.get("TEST_HELD"):  # "round,step,weight": this rank holds that state in memory
    held_round, held_step, held_weight = os.environ["TEST_HELD"].split(",")
    torch.nn.init.constant_(model.weight, float(held_weight))
    held.round, held.completed = int(held_round), int(held_step)
after = held.agree(el, snaps, int(os.environ["ELASTIC_AGENT_ROUND"]))
print(json.dumps({"after": after, "weight": model.weight.item(), "peer": None if snaps is None else snaps.peer}),
      flush=True)
dist.barrier()  # everyone done communicating before the group goes
dist.destroy_process_group()
logging.shutdown()
sys.stderr.flush()
# Past the interpreter's teardown, where torch 2.13's gloo sometimes aborts ("terminate called
# without an active exception", -6) with the snapshot server's threads still about.
os._exit(0)
