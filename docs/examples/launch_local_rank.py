"""A script written for `python -m torch.distributed.launch`: it takes its local rank from
the `--local-rank=N` argument that launcher passed (older scripts: `--local_rank`), not from
LOCAL_RANK. `--local-rank-arg` makes the agent pass it the same way.

    # before (torch.distributed.launch, deprecated since torch 2.0)
    python -m torch.distributed.launch --nnodes 2 --node-rank 0 --nproc-per-node 2 \
        --master-addr node-0 --master-port 29500 launch_local_rank.py --steps 20
    # after (on every node; no node rank or master address to give)
    elastic-agent start --nnodes 2 --nproc-per-node 2 --etcd-endpoints etcd-0:2379 \
        --job-id demo --local-rank-arg -- python launch_local_rank.py --steps 20

See docs/migrating.md.
"""

import argparse
import os

import _toy
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local-rank", "--local_rank", type=int, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)  # docs/migrating.md passes --lr 3e-4
    args = parser.parse_args()
    if args.local_rank != int(os.environ["LOCAL_RANK"]):
        raise SystemExit(f"--local-rank={args.local_rank} but LOCAL_RANK={os.environ['LOCAL_RANK']}")

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    device = torch.device("cuda", args.local_rank) if use_cuda else torch.device("cpu")

    model = DDP(_toy.model().to(device), device_ids=[args.local_rank] if use_cuda else None)
    loss = _toy.fit(model, args.steps, device, args.lr)
    _toy.report("launch", model.module, args.steps, loss)
    del model  # DDP before its process group: else gloo can deadlock at exit (docs/migrating.md)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
