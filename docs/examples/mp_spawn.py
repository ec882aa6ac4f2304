"""A script that used to start its own ranks with torch.multiprocessing.spawn and set
MASTER_ADDR / MASTER_PORT itself, changed to run under elastic-agent (docs/migrating.md).

Before:

    def main(rank, world_size):
        os.environ["MASTER_ADDR"] = "localhost"          # one machine only
        os.environ["MASTER_PORT"] = "12355"
        dist.init_process_group("nccl", rank=rank, world_size=world_size)
        torch.cuda.set_device(rank)                      # global rank = GPU index: one machine only
        ...

    if __name__ == "__main__":
        world_size = torch.cuda.device_count()
        mp.spawn(main, args=(world_size,), nprocs=world_size)

After: the agent starts one process per rank on every node and sets RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT (the master moves with group rank 0 from round to
round, so the script must not pin it). Four changes: don't set MASTER_*, use the local rank
for the device, call main() once instead of spawning, and drop the DDP model before
destroy_process_group(). Run alone (no agent), it still spawns its ranks as before.

    elastic-agent start --nnodes 2 --nproc-per-node 2 --etcd-endpoints etcd-0:2379 \
        --job-id demo -- python mp_spawn.py --steps 20
"""

import argparse
import os

import _toy
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP


def main(rank: int, world_size: int, local_rank: int, steps: int) -> None:
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)  # the local rank, not the global one
    # No MASTER_ADDR / MASTER_PORT here: init_method env:// reads the launcher's.
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    model = DDP(_toy.model().to(device), device_ids=[local_rank] if use_cuda else None)
    loss = _toy.fit(model, steps, device)
    _toy.report("mp.spawn", model.module, steps, loss)
    del model  # DDP before its process group: else gloo can deadlock at exit (docs/migrating.md)
    dist.destroy_process_group()


def spawned(index: int, world_size: int, steps: int) -> None:
    main(index, world_size, index, steps)  # on one machine: rank = local rank = spawn index


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--nprocs", type=int, default=2, help="ranks to spawn when run without a launcher")
    args = parser.parse_args()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by elastic-agent (or torchrun): we are one rank
        main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), args.steps)
    else:  # alone on one machine: spawn the ranks ourselves, as before
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        mp.spawn(spawned, args=(args.nprocs, args.steps), nprocs=args.nprocs)
