"""Who is cut off from its peers, from the peers' reports. Pure: a function of the reports.

Each node probes a small fixed set of peers over the data network (its ring neighbours in
rank order, agent.daemon.peer_probe) and reports the peers it has not heard from for a while.
From those reports, :func:`cut_off` names the nodes to remove:

- a node is suspect when at least ``quorum`` distinct reporters name it (by default 2: both
  of its ring neighbours), so one flaky prober, or one missed probe, removes nobody;
- the reports of a suspect are ignored: a node cut off from its peers reports every one of
  them, and each of those is named by that one reporter only, so only the minority side (the
  node nobody reaches) is removed, never both sides;
- with fewer than ``quorum`` + 1 members nothing is removed: two nodes that cannot reach each
  other cannot tell which side is broken.

Not wired into the rendezvous yet (docs/architecture.md, "The network between nodes").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
