"""An Accelerate script, unchanged, started by elastic-agent instead of `accelerate launch`
(docs/migrating.md). `Accelerator()` reads torchrun's variables, which the agent sets.

    # before (on each machine, with its own --machine_rank)
    accelerate launch --multi_gpu --num_machines 2 --num_processes 4 --machine_rank 0 \
        --main_process_ip node-0 --main_process_port 29500 --mixed_precision bf16 \
        accelerate_train.py --steps 20
    # after (on every node; launch options become Accelerator(...) arguments or ACCELERATE_*
    # variables, e.g. ACCELERATE_MIXED_PRECISION=bf16)
    elastic-agent start --nnodes 2 --nproc-per-node 2 --etcd-endpoints etcd-0:2379 \
        --job-id demo -- python accelerate_train.py --steps 20
"""

import argparse

import _toy
import torch
from accelerate import Accelerator


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # gloo on CPU, NCCL on GPUs
    data = _toy.dataset(0, args.steps * accelerator.num_processes)  # prepare() shards it by rank
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    model = _toy.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    loss = _toy.fit_batches(model, opt, loader, backward=accelerator.backward)
    _toy.report("accelerate", accelerator.unwrap_model(model), len(loader), loss)
    # The prepared model before the process group (else gloo can deadlock at exit, docs/migrating.md);
    # the accelerator holds a reference too, which free_memory drops.
    model, opt, loader = accelerator.free_memory(model, opt, loader)
    accelerator.end_training()


if __name__ == "__main__":
    main()
