"""Reading a closed round's member list, which lives apart from the ``round`` record.

Every node watches ``round``; at a thousand nodes a record that listed every member cost
~90 KB per watcher on every change (a stop asked, a stop step, a grow request, the next round
opened). The list is written once, with the close, under ``rounds/<n>/members``: a node reads
it once per round it takes part in, and the coordinator of the next round reads it as the
previous rank order (docs/architecture.md, "Scale").
"""

from __future__ import annotations

from dataclasses import replace

from rendezvous.errors import CorruptStateError
from rendezvous.settings import Settings
from rendezvous.state import Assignment, RoundPhase, RoundState
from rendezvous.store import KV, Store

ATTEMPTS = 5  # the round moved on while we read: re-read the round, at most this often


def load(store: Store, settings: Settings, kv: KV, known: Assignment | None = None) -> tuple[RoundState, int]:
    """The round record ``kv`` (with its assignment when closed) and its mod-revision. When
    the round moved on before its members could be read (the next close deletes them), the
    current round instead. ``known``: an assignment already read, reused for the same round."""
    rnd = RoundState.decode(kv.key, kv.value)
    revision = kv.mod_revision
    for _ in range(ATTEMPTS):
        if rnd.is_open:
            return rnd, revision
        if known is not None and known.round == rnd.number:
            return replace(rnd, assignment=known), revision
        members, _ = store.get(settings.members_key(rnd.number))
        if members is not None:
            return rnd.with_members(members.key, members.value), revision
        fresh, _ = store.get(settings.round_key)
        if fresh is None:
            break
        rnd, revision = RoundState.decode(fresh.key, fresh.value), fresh.mod_revision
    raise CorruptStateError(settings.members_key(rnd.number), f"the members of closed round {rnd.number}",
                            "no such key")


def previous(store: Store, settings: Settings, number: int) -> tuple[str, ...]:
    """The rank order of round ``number - 1`` (empty for the first round or when it is gone)."""
    if number <= 1:
        return ()
    kv, _ = store.get(settings.members_key(number - 1))
    if kv is None:
        return ()
    assignment = RoundState(number - 1, RoundPhase.CLOSED).with_members(kv.key, kv.value).assignment
    return assignment.node_ids if assignment else ()
