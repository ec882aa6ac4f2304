"""The toy problem the migration examples share (docs/migrating.md): a linear model fitted to
y = 3x - 1 on data that differs per rank, and a check that every rank ended with the same
weights (so the gradients really were averaged across the job). Not a launcher example itself."""

from __future__ import annotations

import torch
import torch.distributed as dist


def model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return torch.nn.Linear(1, 1)


def batch(rank: int, step: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(size, 1, generator=g)
    return x, 3 * x - 1


def dataset(rank: int, steps: int) -> torch.utils.data.TensorDataset:
    xs, ys = zip(*(batch(rank, step) for step in range(steps)))
    return torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))


def fit(module: torch.nn.Module, steps: int, device: torch.device, lr: float = 0.1) -> float:
    """Plain SGD on this rank's batches (``module`` is DDP-wrapped: gradients are averaged)."""
    batches = [tuple(t.to(device) for t in batch(dist.get_rank(), step)) for step in range(steps)]
    return fit_batches(module, torch.optim.SGD(module.parameters(), lr=lr), batches)


def fit_batches(module, opt, batches, backward=lambda loss: loss.backward()) -> float:
    """The training loop: ``backward`` is the framework's (``accelerator.backward``,
    ``fabric.backward``) where it has one. Returns the last loss."""
    loss = torch.zeros(())
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(module(x), y)
        opt.zero_grad()
        backward(loss)
        opt.step()
    return loss.item()


def in_sync(module: torch.nn.Module) -> bool:
    """Whether every rank holds the same weights as rank 0 (a collective: call it on all ranks)."""
    flat = torch.cat([p.detach().reshape(-1).cpu() for p in module.parameters()])
    first = flat.clone()
    dist.broadcast(first, src=0)
    return bool(torch.equal(flat, first))


def report(name: str, module: torch.nn.Module, steps: int, loss: float) -> None:
    """One line on global rank 0; fails the worker (exit 1) when the ranks drifted apart."""
    ok = in_sync(module)
    if not ok:
        raise SystemExit(f"{name}: rank {dist.get_rank()} holds different weights than rank 0")
    if dist.get_rank() == 0:
        print(f"{name}: trained {steps} steps, world size {dist.get_world_size()}, loss {loss:.4f}", flush=True)
