"""State on the wire: versioned JSON parsed into frozen dataclasses.

Every record carries ``"v": 1``. Anything that fails to parse raises
:class:`~rendezvous.errors.CorruptStateError` naming the key and what was expected, so a bad
value in etcd is a one-line error, never a traceback from deep inside.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, NamedTuple

from rendezvous.errors import CorruptStateError

VERSION = 1


class RoundPhase(StrEnum):
    """``round.state`` on the wire: a round takes joiners while open; closed, it has an assignment."""

    OPEN = "open"
    CLOSED = "closed"


class Outcome(StrEnum):
    """``status.outcome`` on the wire."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"


def _load(key: str, raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        raise CorruptStateError(key, f"a JSON {what} record", _preview(raw)) from None
    if not isinstance(data, dict):
        raise CorruptStateError(key, f"a JSON object ({what} record)", _preview(raw))
    if type(data.get("v")) is not int or data.get("v") != VERSION:  # true and 1.0 equal 1 too
        raise CorruptStateError(key, f'"v": {VERSION} ({what} record)', f'"v": {data.get("v")!r}')
    return data


def _preview(raw: bytes) -> str:
    text = raw[:60].decode("utf-8", "replace")
    return repr(text) + ("..." if len(raw) > 60 else "")


def _field(key: str, data: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(name)
    # bool is an int in Python; a record field that wants an int never means a bool.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise CorruptStateError(key, f"field {name!r} of type {expected}", repr(value))
    return value


def _ranged(key: str, data: dict[str, Any], name: str, low: int, high: int | None = None) -> int:
    """An integer field within [low, high]: a port, a count, a number of processes."""
    value = _field(key, data, name, int)
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise CorruptStateError(key, f"field {name!r} in {bounds}", repr(value))
    return value


def _text(key: str, data: dict[str, Any], name: str) -> str:
    value = _field(key, data, name, str)
    if not value.strip():
        raise CorruptStateError(key, f"field {name!r} non-empty", repr(value))
    return value


def _address(key: str, data: dict[str, Any], name: str) -> str:
    """A host name or address: it becomes the workers' MASTER_ADDR, so no space or control character."""
    value = _text(key, data, name)
    if not _is_address(value):
        raise CorruptStateError(key, f"field {name!r} a host name or address", repr(value))
    return value


def _is_address(text: str) -> bool:
    return text.isprintable() and " " not in text  # isprintable: no separator but " ", no control


def _one_of(key: str, data: dict[str, Any], name: str, kind: type[StrEnum]) -> Any:
    value = _field(key, data, name, str)
    try:
        return kind(value)
    except ValueError:
        allowed = " or ".join(repr(member.value) for member in kind)
        raise CorruptStateError(key, f"field {name!r} of {allowed}", repr(value)) from None


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps({"v": VERSION, **data}, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class NodeRecord:
    """``nodes/<node-id>``: a live node (the key is attached to the node's lease)."""

    node_id: str
    addr: str
    nproc: int
    host: str = ""
    version: str = ""
    # The UDP port of the agent's probe server on ``addr`` (agent.daemon.connection.peer_probe); 0: none.
    probe_port: int = 0

    def encode(self) -> bytes:
        data = {"node_id": self.node_id, "addr": self.addr, "nproc": self.nproc,
                "host": self.host, "version": self.version}
        return _dump({**data, "probe_port": self.probe_port} if self.probe_port else data)

    @classmethod
    def decode(cls, key: str, raw: bytes) -> NodeRecord:
        d = _load(key, raw, "node")
        return cls(
            node_id=_text(key, d, "node_id"),
            addr=_address(key, d, "addr"),
            nproc=_ranged(key, d, "nproc", 1),
            host=d.get("host", "") if isinstance(d.get("host", ""), str) else "",
            version=d.get("version", "") if isinstance(d.get("version", ""), str) else "",
            probe_port=_ranged(key, d, "probe_port", 1, 65535) if "probe_port" in d else 0,
        )


@dataclass(frozen=True)
class JoinRecord:
    """``rounds/<n>/joined/<node-id>``: a node taking part in round n (leased).

    ``master_port`` is a port this node reserved in case it becomes group rank 0.
    """

    node_id: str
    addr: str
    nproc: int
    master_port: int

    def encode(self) -> bytes:
        return _dump(
            {"node_id": self.node_id, "addr": self.addr, "nproc": self.nproc,
             "master_port": self.master_port}
        )

    @classmethod
    def decode(cls, key: str, raw: bytes) -> JoinRecord:
        d = _load(key, raw, "join")
        return cls(
            node_id=_text(key, d, "node_id"),
            addr=_address(key, d, "addr"),
            nproc=_ranged(key, d, "nproc", 1),
            master_port=_ranged(key, d, "master_port", 1, 65535),
        )


class Member(NamedTuple):
    node_id: str
    addr: str
    nproc: int


@dataclass(frozen=True)
class Assignment:
    """The outcome of a closed round: members in group-rank order."""

    round: int
    members: tuple[Member, ...]
    master_addr: str
    master_port: int
    standbys: tuple[str, ...] = ()

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(m.node_id for m in self.members)

    def group_rank(self, node_id: str) -> int | None:
        for rank, member in enumerate(self.members):
            if member.node_id == node_id:
                return rank
        return None

    @property
    def world_size(self) -> int:
        return sum(m.nproc for m in self.members)

    def rank_offset(self, node_id: str) -> int:
        """Global rank of the node's local rank 0."""
        offset = 0
        for m in self.members:
            if m.node_id == node_id:
                return offset
            offset += m.nproc
        raise KeyError(node_id)


@dataclass(frozen=True)
class RoundState:
    """``round``: the current round. Changed only by compare-and-swap on its mod-revision."""

    number: int
    state: RoundPhase
    reason: str = ""
    # Members of the previous round in rank order: survivors keep their relative order. Not
    # on the wire: the coordinator alone reads them from the previous round's members key.
    previous: tuple[str, ...] = ()
    assignment: Assignment | None = field(default=None)
    # A planned change of a closed round, announced before the next round opens: every rank
    # stops (or re-forms in process) right after completing step ``stop_at``.
    stop_at: int | None = None
    # A standby asked to grow the job; the round's group rank 0 picks the step to stop at.
    grow_request: str = ""
    # A planned stop was asked for: every member stops clearing steps and answers how far
    # its workers may go (Settings.cleared_prefix); ``stop_at`` is then chosen past them all.
    stop_asked: bool = False
    # Open round: members cut off from their peers (rendezvous.protocol.reachability), neither waited
    # for nor admitted when it closes.
    left_out: tuple[str, ...] = ()

    @property
    def is_open(self) -> bool:
        return self.state == RoundPhase.OPEN

    def encode(self) -> bytes:
        """The ``round`` record: a few facts, never the member list (that is ``encode_members``,
        under its own key), so a change every node watches costs each of them O(1) bytes."""
        data: dict[str, Any] = {"number": self.number, "state": self.state, "reason": self.reason}
        if self.stop_at is not None:
            data["stop_at"] = self.stop_at
        if self.grow_request:
            data["grow_request"] = self.grow_request
        if self.stop_asked:
            data["stop_asked"] = True
        if self.left_out:
            data["left_out"] = list(self.left_out)
        return _dump(data)

    def encode_members(self) -> bytes:
        """``rounds/<n>/members``: the closed round's assignment, written once with the close."""
        assert self.assignment is not None
        a = self.assignment
        return _dump({"round": self.number, "members": [[m.node_id, m.addr, m.nproc] for m in a.members],
                      "master_addr": a.master_addr, "master_port": a.master_port, "standbys": list(a.standbys)})

    @classmethod
    def decode(cls, key: str, raw: bytes) -> RoundState:
        """The ``round`` record alone: a closed round's assignment is ``with_members``' business."""
        d = _load(key, raw, "round")
        reason = d.get("reason", "")
        stop_at = _ranged(key, d, "stop_at", 0) if "stop_at" in d else None
        grow = d.get("grow_request", "")
        left = d.get("left_out", [])
        return cls(number=_ranged(key, d, "number", 1), state=_one_of(key, d, "state", RoundPhase),
                   reason=reason if isinstance(reason, str) else "", stop_at=stop_at,
                   grow_request=grow if isinstance(grow, str) else "", stop_asked=d.get("stop_asked") is True,
                   left_out=tuple(n for n in left if isinstance(n, str)) if isinstance(left, list) else ())

    def with_members(self, key: str, raw: bytes) -> RoundState:
        """This closed round with its assignment read from ``rounds/<n>/members`` (``key``)."""
        d = _load(key, raw, "members")
        if _ranged(key, d, "round", 1) != self.number:
            raise CorruptStateError(key, f"the members of round {self.number}", repr(d.get("round")))
        members = []
        # A thousand-node assignment is decoded by every node: keep this loop lean.
        for item in _field(key, d, "members", list):
            if (type(item) is not list or len(item) != 3 or type(item[0]) is not str or type(item[1]) is not str
                    or type(item[2]) is not int):
                raise CorruptStateError(key, "members as [node_id, addr, nproc]", repr(item))
            node_id, addr, nproc = item
            if not node_id or not addr or not _is_address(addr) or nproc < 1:
                raise CorruptStateError(key, "members with a node_id, an addr (a host) and nproc >= 1", repr(item))
            members.append(Member(node_id, addr, nproc))
        if not members or len({m.node_id for m in members}) != len(members):
            raise CorruptStateError(key, "a closed round with members, each node once",
                                    repr([m.node_id for m in members]))
        assignment = Assignment(
            round=self.number, members=tuple(members), master_addr=_address(key, d, "master_addr"),
            master_port=_ranged(key, d, "master_port", 1, 65535),
            standbys=tuple(_strings(key, d.get("standbys", []), "standbys")))
        return replace(self, assignment=assignment)


def _strings(key: str, value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise CorruptStateError(key, f"field {name!r} as a list of strings", repr(value))
    return value


@dataclass(frozen=True)
class JobStatus:
    """``status``: the job's outcome, written once."""

    outcome: Outcome
    reason: str

    def encode(self) -> bytes:
        return _dump({"outcome": self.outcome, "reason": self.reason})

    @classmethod
    def decode(cls, key: str, raw: bytes) -> JobStatus:
        d = _load(key, raw, "status")
        return cls(outcome=_one_of(key, d, "outcome", Outcome), reason=_field(key, d, "reason", str))


@dataclass(frozen=True)
class RestartCount:
    """``restarts``: the job-wide restart counter, changed by compare-and-swap."""

    count: int
    last_reason: str = ""

    def encode(self) -> bytes:
        return _dump({"count": self.count, "last_reason": self.last_reason})

    @classmethod
    def decode(cls, key: str, raw: bytes) -> RestartCount:
        d = _load(key, raw, "restarts")
        reason = d.get("last_reason", "")
        return cls(count=_ranged(key, d, "count", 0),
                   last_reason=reason if isinstance(reason, str) else "")
