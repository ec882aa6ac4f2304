"""The training state one worker holds in memory, and how the ranks of a new process group
agree on it: the most advanced rank broadcasts its state, new ranks included. When no rank
holds any (every worker is new: the job's first start, or all its workers restarted), the
newest in-memory snapshot a node kept (agent.worker.snapshot) is used if it is newer than the
latest disk checkpoint; only otherwise is a checkpoint read from disk. Torch only."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from agent.worker import checkpoint as ckpt
from agent.worker.choice import record_round
from agent.worker.manifest import order_key

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

    def agree(self, elastic: Any, snapshots: Any = None, round_number: int = 0) -> int:
        """Collective: every rank ends up with the state of the most advanced one. Returns
        the step every rank now holds (-1: none, start from the beginning). ``snapshots``
        (agent.worker.snapshot.Snapshots, on local rank 0 of each node) also learns its peer;
        it offers a snapshot of an earlier round than ``round_number``, never of this one or
        later (those are not this job's)."""
        world = dist.get_world_size()
        if world == 1 and self.completed >= 0:
            return self.completed
        mine = {"completed": self.completed, "address": None if snapshots is None else snapshots.address,
                "snapshot": snapshots.offer(round_number - 1) if snapshots is not None and self.completed < 0 else None}
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        if snapshots is not None:
            snapshots.choose_peer([e["address"] for e in everyone], dist.get_rank())
        steps = [e["completed"] for e in everyone]
        best = max(steps)
        if best < 0:  # nobody holds any state in memory
            return self._resume(elastic, snapshots, [e["snapshot"] for e in everyone])
        if any(step != best for step in steps):  # somebody lacks it (a newcomer, a rank behind)
            self._take(steps.index(best), self.completed != best, f"the state of step {best}")
        self.completed = best
        return best

    def _resume(self, elastic: Any, snapshots: Any, offers: list[tuple[int, int] | None]) -> int:
        """From the newest snapshot when it is newer than the latest disk checkpoint, else from
        disk. Rank 0 decides (every rank must read the same choice), the holder broadcasts."""
        source = None
        if any(offers):
            decision: list[Any] = [None]
            if dist.get_rank() == 0:
                try:
                    decision[0] = _newer_than_disk(elastic, offers)
                except Exception as exc:  # noqa: BLE001 - the others wait on this choice: never leave them
                    log.warning("cannot compare the snapshots with the checkpoints on disk (%s); "
                                "resuming from disk", exc)
            dist.broadcast_object_list(decision, src=0)
            source = decision[0]
        if source is not None:
            state = snapshots.take() if dist.get_rank() == source else None
            payload = [state]
            dist.broadcast_object_list(payload, src=source)
            if payload[0] is not None:
                self.load(payload[0])
                self.completed = int(payload[0]["step"])
                log.info("resumed from the in-memory snapshot of step %d (rank %d's node)", self.completed, source)
                return self.completed
            log.warning("the snapshot rank %d offered could not be loaded; resuming from disk", source)
        start, state = elastic.load(default=None)
        if state is not None:
            self.load(state)
        self.completed = start - 1
        return self.completed

    def _take(self, source: int, load: bool, what: str) -> None:
        # In host memory: tensors sent from GPU memory would be unpickled onto the source's GPU.
        payload = [on_cpu(self.state_dict()) if dist.get_rank() == source else None]
        dist.broadcast_object_list(payload, src=source)
        if load:
            self.load(payload[0])
            log.info("took %s from rank %d", what, source)


def on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def _newer_than_disk(elastic: Any, offers: list[tuple[int, int] | None]) -> int | None:
    """The rank whose snapshot is newest, when it is newer by (round, step) than the latest
    complete checkpoint on disk; None: resume from disk."""
    source = max((r for r, offer in enumerate(offers) if offer is not None), key=lambda r: offers[r])
    snap_round, snap_step = offers[source]  # type: ignore[misc]
    directory = elastic.checkpoint_dir
    latest = ckpt.complete_checkpoints(directory)[-1:] if directory is not None else []
    if latest and order_key(latest[0]) >= (True, snap_round, snap_step):
        log.info("the latest checkpoint (step %d) is as new as any snapshot (step %d): resuming from disk",
                 latest[0].step, snap_step)
        return None
    if directory is not None and elastic.round_number is not None:
        record_round(directory, elastic.round_number)  # an older round's late save is refused, as after a load
    return source
