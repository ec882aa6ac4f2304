"""A worker that trains (one all-reduce over gloo), destroys its group and exits 0, except
global rank argv[1], which then never exits: a worker hung in teardown after its work was done."""

import os
import sys
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)
print(f"rank {dist.get_rank()} trained: sum {int(total.item())}", flush=True)
dist.destroy_process_group()
if int(os.environ["RANK"]) == int(sys.argv[1]):
    print("lingering", flush=True)
    while True:
        time.sleep(1)
