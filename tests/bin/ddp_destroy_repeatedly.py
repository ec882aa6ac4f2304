"""Many short DDP jobs of one rank in one process, each ending as PyTorch's DDP tutorial does:
``destroy_process_group()`` a moment after the last ``backward()``, the DDP model dropped just
after. Each ending can deadlock in torch (the group's destructor, holding the GIL, joins a gloo
thread that waits for the GIL to drop its finished all-reduce); ``ITERATIONS`` of them (argv[1],
default 200) make a run that survives them all good evidence the ending is safe."""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 200
for _ in range(iterations):
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    model = DDP(torch.nn.Linear(20, 1))
    model(torch.rand(8, 20)).sum().backward()
    dist.destroy_process_group()
    del model
print(f"survived {iterations}", flush=True)
