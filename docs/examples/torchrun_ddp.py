"""A plain torchrun script, unchanged: it runs under elastic-agent as it ran under torchrun.

    # before
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint node-0:29400 \
        --rdzv-id demo torchrun_ddp.py --steps 20
    # after (on every node)
    elastic-agent start --nnodes 2 --nproc-per-node 2 --etcd-endpoints etcd-0:2379 \
        --job-id demo -- python torchrun_ddp.py --steps 20

Everything it reads (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...) the agent
sets with torchrun's meaning. See docs/migrating.md.
"""

import argparse
import os

import _toy
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.1)  # docs/migrating.md passes --lr 3e-4
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")  # env:// - the launcher's variables
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")

    model = DDP(_toy.model().to(device), device_ids=[local_rank] if use_cuda else None)
    loss = _toy.fit(model, args.steps, device, args.lr)
    _toy.report("torchrun", model.module, args.steps, loss)
    del model  # DDP before its process group: else gloo can deadlock at exit (docs/migrating.md)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
