"""The training state one worker holds in memory, and how the ranks of a new process group
agree on it: one rule (``choice.newest_source``) picks the newest (round, step) among the
state ranks hold in memory, the in-memory snapshots nodes kept (agent.worker.snapshot) and the
newest disk checkpoint, and its holder broadcasts it, new ranks included. A rank idle in an
old round never rolls the job back. Nothing passes between ranks as a pickle: small messages
are JSON, states are ``torch.save`` bytes loaded with ``weights_only=True``. Torch only."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from agent.worker import checkpoint as ckpt
from agent.worker.choice import Key, Source, newest_source, record_round

log = logging.getLogger(__name__)


class HeldState:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 extra: Callable[[], dict[str, Any]] | None = None,
                 load_extra: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.model, self.optimizer, self.extra, self.load_extra = model, optimizer, extra, load_extra
        self.completed = -1  # the last step whose optimizer step landed in this process
        self.round = 0  # the round of the last agreement: the steps completed since are of it
        self.endpoints: set[tuple[str, int]] = set()  # the members' sockets' local endpoints, at the last agreement
        self.sharded: Callable[[HeldState], dict[str, Any]] | None = None  # a sharded model's state (sharded_memory)

    def state_dict(self) -> dict[str, Any]:
        if self.sharded is not None:
            return self.sharded(self)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.completed}
        if self.extra is not None:
            state["extra"] = self.extra()
        return state

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.load_extra is not None and "extra" in state:
            self.load_extra(state["extra"])

    def agree(self, elastic: Any, snapshots: Any = None, round_number: int = 0,
              endpoints: list[tuple[str, int]] | None = None) -> int:
        """Collective: every rank ends up with the newest state by (round, step) among what
        the ranks hold in memory, the snapshots the nodes offer and the newest checkpoint on
        disk (``choice.newest_source``). Returns the step every rank now holds (-1: none,
        start from the beginning). ``snapshots`` (agent.worker.snapshot.Snapshots, on local
        rank 0 of each node) also learns its peer; it offers a snapshot of an earlier round
        than ``round_number``, never of this one or later (those are not this job's).
        ``endpoints``: the local endpoints of this rank's connected sockets; every rank's end
        up in ``self.endpoints`` (how a rank tells the group's connections from its others).
        Exchanged here, the one collective every path into a group runs, so that no rank runs
        a collective the others do not."""
        if hasattr(snapshots, "agree"):  # a sharded model's snapshots (agent.worker.sharded_memory)
            return snapshots.agree(self, elastic, round_number, endpoints or [])
        world = dist.get_world_size()
        self.endpoints = set(endpoints or ())
        if world == 1 and self.completed >= 0:
            self.round = round_number
            return self.completed
        offer = snapshots.offer(round_number - 1) if snapshots is not None and self.completed < 0 else None
        mine = {"completed": self.completed, "round": self.round,
                "address": None if snapshots is None else snapshots.address, "snapshot": offer,
                "endpoints": sorted(self.endpoints)}
        everyone = [_message(raw) for raw in _all_gather_bytes(json.dumps(mine).encode())]
        self.endpoints = {tuple(e) for rank in everyone for e in rank["endpoints"]}  # type: ignore[misc]
        if snapshots is not None:
            snapshots.choose_peer([e["address"] for e in everyone], dist.get_rank())
        memory = [(e["round"], e["completed"]) if e["completed"] >= 0 else None for e in everyone]
        offers = [e["snapshot"] for e in everyone]
        if memory[0] is not None and all(m == memory[0] for m in memory):  # one group, one state
            self.round = round_number
            return self.completed
        source = self._decide(elastic, memory, offers)
        if source.kind == "memory" and source.rank is not None:
            best = memory[source.rank]
            assert best is not None
            self._take(source.rank, memory[dist.get_rank()] != best, f"the state of step {best[1]}")
            self.completed = best[1]
        elif not (source.kind == "snapshot" and self._from_snapshot(snapshots, source.rank)):
            start, state = elastic.load(default=None)
            if state is not None:
                self.load(state)
            self.completed = start - 1
        self.round = round_number
        return self.completed

    def _decide(self, elastic: Any, memory: list[Key | None], offers: list[Key | None]) -> Source:
        """Rank 0 applies the rule (it alone lists the checkpoints), everyone learns its choice."""
        if not any(offers) and not any(memory):
            return Source("disk")  # elastic.load chooses among the checkpoints itself
        decision = None
        if dist.get_rank() == 0:
            try:
                disk = _newest_on_disk(elastic)
            except Exception as exc:  # noqa: BLE001 - the others wait on this choice: never leave them
                log.warning("cannot list the checkpoints on disk (%s); comparing memory and snapshots only", exc)
                disk = None
            decision = newest_source(memory, offers, disk)
            log.info("resuming from %s (memory %s, snapshots %s, disk %s)", decision, memory, offers, disk)
            if decision.kind == "snapshot" and elastic.checkpoint_dir is not None and elastic.round_number is not None:
                record_round(elastic.checkpoint_dir, elastic.round_number)  # an older round's late save is refused
            decision = json.dumps({"kind": decision.kind, "rank": decision.rank}).encode()
        raw = json.loads(_broadcast_bytes(decision, 0) or b"{}")
        return Source(str(raw.get("kind")), raw.get("rank") if type(raw.get("rank")) is int else None)

    def _from_snapshot(self, snapshots: Any, source: int | None) -> bool:
        state = None
        if dist.get_rank() == source and snapshots is not None:
            state = snapshots.take()
        payload = _broadcast_bytes(_serialized(state) if dist.get_rank() == source else None, source or 0)
        if payload is None:
            log.warning("the snapshot rank %s offered could not be loaded; resuming from disk", source)
            return False
        loaded = _deserialized(payload)
        self.load(loaded)
        self.completed = int(loaded["step"])
        log.info("resumed from the in-memory snapshot of step %d (rank %s's node)", self.completed, source)
        return True

    def _take(self, source: int, load: bool, what: str) -> None:
        # Tensors only, in host memory (tensors sent from GPU memory would land on the source's GPU).
        payload = _broadcast_bytes(_serialized(on_cpu(self.state_dict())) if dist.get_rank() == source else b"",
                                   source)
        if load and payload is not None:
            self.load(_deserialized(payload))
            log.info("took %s from rank %d", what, source)


def _serialized(state: Any) -> bytes | None:
    if state is None:
        return None
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _deserialized(payload: bytes) -> dict[str, Any]:
    """Another rank's state: tensors and plain containers only, never unpickled."""
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def _message(raw: bytes) -> dict[str, Any]:
    """Another rank's part of the agreement (JSON), its fields checked."""
    msg = json.loads(raw)

    def key(value: Any) -> Key | None:
        return (int(value[0]), int(value[1])) if isinstance(value, list) and len(value) == 2 else None

    def endpoint(value: Any) -> tuple[str, int] | None:
        ok = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and type(value[1]) is int
        return (value[0], value[1]) if ok else None

    address = msg.get("address")
    endpoints = msg.get("endpoints")
    return {"completed": int(msg.get("completed", -1)), "round": int(msg.get("round", 0)),
            "address": address if isinstance(address, str) else None, "snapshot": key(msg.get("snapshot")),
            "endpoints": [e for e in map(endpoint, endpoints if isinstance(endpoints, list) else []) if e]}


def _device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo only host ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (collective)."""
    mine = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_device())
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return bool(mine.item())


def _broadcast_bytes(data: bytes | None, src: int) -> bytes | None:
    """``src``'s bytes (None stays None) on every rank, as tensors: no pickle between ranks."""
    device = _device()
    size = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    n = int(size.item())
    if n <= 0:
        return None if n < 0 else b""
    if dist.get_rank() == src:
        assert data is not None
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(n, dtype=torch.uint8, device=device)
    dist.broadcast(buf, src)
    return buf.cpu().numpy().tobytes()


def _all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's ``data``, in rank order, as tensors."""
    device, world = _device(), dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=device))
    longest = max(int(s.item()) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(parts, mine)
    return [p[:int(s.item())].cpu().numpy().tobytes() for p, s in zip(parts, sizes)]


def on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def _newest_on_disk(elastic: Any) -> Key | None:
    """(round, step) of the newest complete checkpoint (no round: below every round)."""
    directory = elastic.checkpoint_dir
    latest = ckpt.complete_checkpoints(directory)[-1:] if directory is not None else []
    if not latest:
        return None
    round_number = latest[0].round_number
    return (-1 if round_number is None else round_number, latest[0].step)
