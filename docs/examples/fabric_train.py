"""A Lightning Fabric script started by elastic-agent instead of `fabric run` or Fabric's own
process launching (docs/migrating.md). Fabric sees torchrun's variables (TorchElasticEnvironment)
and creates no processes itself; the one change is to take `devices` and `num_nodes` from the
agent, because an elastic job's size is not known when the script is written.

    # before (on each machine, with its own --node-rank)
    fabric run --accelerator cuda --strategy ddp --devices 2 --num-nodes 2 --node-rank 0 \
        --main-address node-0 --main-port 29500 fabric_train.py --steps 20
    # after (on every node)
    elastic-agent start --nnodes 2 --nproc-per-node 2 --etcd-endpoints etcd-0:2379 \
        --job-id demo -- python fabric_train.py --steps 20
"""

import argparse
import os

import _toy
import torch
from lightning_fabric import Fabric


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    fabric = Fabric(
        accelerator="cuda" if torch.cuda.is_available() else "cpu",
        strategy="ddp",
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),  # this node's workers
        num_nodes=int(os.environ.get("GROUP_WORLD_SIZE", 1)),  # this round's nodes
    )
    fabric.launch()  # under the agent: joins the process group, starts nothing
    model = _toy.model()
    model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    data = _toy.dataset(0, args.steps * fabric.world_size)
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(data, batch_size=16))  # sharded by rank
    loss = _toy.fit_batches(model, opt, loader, backward=fabric.backward)
    _toy.report("fabric", model.module, len(loader), loss)


if __name__ == "__main__":
    main()
