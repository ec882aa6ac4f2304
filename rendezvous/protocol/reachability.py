"""Who is cut off from its peers, from the peers' reports. Pure: a function of the reports.

Each node probes a small fixed set of peers over the data network (its ring neighbours in
rank order, agent.daemon.connection.peer_probe) and reports the peers it has not heard from for a while.
From those reports, :func:`cut_off` names the nodes to remove:

- a node is suspect when at least ``quorum`` distinct reporters name it (by default 2: both
  of its ring neighbours), so one flaky prober, or one missed probe, removes nobody;
- the reports of a suspect are ignored: a node cut off from its peers reports every one of
  them, and each of those is named by that one reporter only, so only the minority side (the
  node nobody reaches) is removed, never both sides;
- with fewer than ``quorum`` + 1 members nothing is removed: two nodes that cannot reach each
  other cannot tell which side is broken.

A report is ``reach/<node-id>`` (:class:`Report`), on the reporter's membership lease, written
only when the set of peers it cannot reach changes. Whoever writes a report reads the prefix
right after (:func:`decide`): of the reporters whose reports together name a node, the last to
write sees them all, so no node watches anything and no coordinator is needed to act.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from rendezvous.settings import valid_id

QUORUM = 2


def ring_peers(members: Iterable[str], me: str) -> tuple[str, ...]:
    """The peers ``me`` probes: the members just before and after it in the given order."""
    order = list(members)
    if me not in order or len(order) < 2:
        return ()
    i = order.index(me)
    peers = {order[i - 1], order[(i + 1) % len(order)]} - {me}
    return tuple(sorted(peers))


def cut_off(reports: Mapping[str, Iterable[str]], members: Iterable[str], quorum: int = QUORUM) -> frozenset[str]:
    """Members to remove: named by at least ``quorum`` reporters that are not themselves suspect.
    ``reports``: reporter -> peers it cannot reach; reporters and peers outside ``members``
    are ignored."""
    group = set(members)
    if len(group) < quorum + 1:
        return frozenset()
    heard = {r: set(peers) & group - {r} for r, peers in reports.items() if r in group}

    def suspects(trusted: set[str]) -> frozenset[str]:
        named: dict[str, int] = {}
        for reporter in trusted:
            for peer in heard[reporter]:
                named[peer] = named.get(peer, 0) + 1
        return frozenset(p for p, n in named.items() if n >= quorum)

    # Drop the suspects' own reports until nothing changes (each pass can only shrink the set
    # of trusted reporters, so this ends within len(members) passes).
    trusted = set(heard)
    found = suspects(trusted)
    while trusted - found != trusted:
        trusted -= found
        found = suspects(trusted)
    # Never more than a minority: a majority "cut off" is the reporters' own side failing.
    return found if len(found) * 2 < len(group) else frozenset()


@dataclass(frozen=True)
class Report:
    """``reach/<node-id>``: the members of round ``round`` this node cannot reach. ``kept_out``:
    the node itself is held back (it cannot reach the members it would neighbour)."""

    round: int
    unreachable: tuple[str, ...]
    kept_out: bool = False

    def encode(self) -> bytes:
        data = {"v": 1, "round": self.round, "unreachable": sorted(self.unreachable)}
        return json.dumps({**data, "kept_out": True} if self.kept_out else data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Report | None:
        """The report, or None for anything malformed (a value from etcd is hostile: at most
        64 ids, each a valid node id)."""
        try:
            d = json.loads(raw[:8192])
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
        if not isinstance(d, dict) or d.get("v") != 1:
            return None
        number, peers = d.get("round"), d.get("unreachable")
        if type(number) is not int or not isinstance(peers, list) or len(peers) > 64:
            return None
        if not all(isinstance(p, str) and valid_id(p) for p in peers):
            return None
        return cls(number, tuple(peers), d.get("kept_out") is True)


def decide(reports: Mapping[str, bytes], members: Iterable[str], number: int) -> frozenset[str]:
    """The members of round ``number`` to cut off, from the raw ``reach/`` records (node id ->
    value); reports of another round, or unreadable, count for nothing."""
    current = {}
    for node, raw in reports.items():
        report = Report.decode(raw)
        if report is not None and report.round == number:
            current[node] = report.unreachable
    return cut_off(current, members)


def prospective_peers(members: Iterable[str], me: str) -> tuple[str, ...]:
    """The peers a node that is not a member would have as ring neighbours once admitted: a
    newcomer takes the last rank (decide.rank_order), between the last member and the first."""
    order = [m for m in members if m != me]
    return ring_peers([*order, me], me)
