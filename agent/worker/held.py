"""The training state one worker holds in memory, and how the ranks of a new process group
agree on it: the most advanced rank broadcasts its state, new ranks included; only when no
rank holds any (the job's first start) is a checkpoint read from disk. Torch only."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class HeldState:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 extra: Callable[[], dict[str, Any]] | None = None,
                 load_extra: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.model, self.optimizer, self.extra, self.load_extra = model, optimizer, extra, load_extra
        self.completed = -1  # the last step whose optimizer step landed in this process

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.completed}
        if self.extra is not None:
            state["extra"] = self.extra()
        return state

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.load_extra is not None and "extra" in state:
            self.load_extra(state["extra"])

    def agree(self, elastic: Any) -> int:
        """Collective: every rank ends up with the state of the most advanced one. Returns
        the step every rank now holds (-1: none, start from the beginning)."""
        world = dist.get_world_size()
        if world == 1 and self.completed >= 0:
            return self.completed
        steps: list[Any] = [None] * world
        dist.all_gather_object(steps, self.completed)
        best = max(steps)
        if best < 0:  # nobody holds any state: the job's first start (or every rank new)
            start, state = elastic.load(default=None)
            if state is not None:
                self.load(state)
            self.completed = start - 1
            return self.completed
        source = steps.index(best)
        payload = [self.state_dict() if dist.get_rank() == source else None]
        dist.broadcast_object_list(payload, src=source)
        if self.completed != best:
            self.load(payload[0])
            log.info("took the state of step %d from rank %d", best, source)
        self.completed = best
        return best
