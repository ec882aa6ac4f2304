"""A script in the style of NVIDIA apex's examples (written before torch 2.0): it parses only
``--local_rank`` (with an underscore, as torch.distributed.launch passed it then), defaults it
to 0, and decides it is distributed from ``WORLD_SIZE``. Unchanged, it runs under the agent
with the argument spelled out in the command (``${local_rank}`` becomes each worker's local
rank, as under torchrun):

    elastic-agent start --nnodes 2 --nproc-per-node 2 --etcd-endpoints etcd-0:2379 \\
        --job-id demo -- python apex_local_rank.py --local_rank='${local_rank}' --steps 20

(``--local-rank-arg`` passes the newer spelling ``--local-rank=N``, which this parser rejects.)
See docs/migrating.md.
"""

import argparse
import os

import _toy
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", default=0, type=int)
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--lr", type=float, default=0.1)  # docs/migrating.md passes --lr 3e-4
args = parser.parse_args()

args.distributed = False
if "WORLD_SIZE" in os.environ:
    args.distributed = int(os.environ["WORLD_SIZE"]) > 1

args.gpu = 0
args.world_size = 1
use_cuda = torch.cuda.is_available()
if args.distributed:
    args.gpu = args.local_rank
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    args.world_size = dist.get_world_size()
if args.local_rank != int(os.environ.get("LOCAL_RANK", 0)):
    raise SystemExit(f"--local_rank={args.local_rank} but LOCAL_RANK={os.environ.get('LOCAL_RANK')}")

device = torch.device("cuda", args.gpu) if use_cuda else torch.device("cpu")
model = _toy.model().to(device)
if args.distributed:
    model = DDP(model, device_ids=[args.gpu] if use_cuda else None)
loss = _toy.fit(model, args.steps, device, args.lr)
_toy.report("apex", model.module if args.distributed else model, args.steps, loss)
del model  # DDP before its process group: else gloo can deadlock at exit (docs/migrating.md)
if args.distributed:
    dist.destroy_process_group()
