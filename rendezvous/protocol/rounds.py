"""Moving the job past a round: open the next one by compare-and-swap, and watch one member
so that its loss opens the next round at once.

Each member watches its ring predecessor (:func:`rendezvous.protocol.decide.ring_predecessor`), so every
loss is noticed by exactly one node and no node watches more than one key. A standby watches
the closed round's group rank 0: the ring misses a lone member, or every member lost at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from rendezvous.protocol import decide
from rendezvous.protocol.answers import await_answers
from rendezvous.protocol.inbox import Inbox, InboxItem, ItemKind
from rendezvous.reasons import Reason, reason_text
from rendezvous.settings import Settings
from rendezvous.state import RoundState
from rendezvous.store import DELETE, Store

log = logging.getLogger(__name__)


def _closed(store: Store, settings: Settings, number: int) -> tuple[RoundState, int] | None:
    """Round ``number`` and its mod-revision, read fresh, if it is still the current round
    and closed (so a stale view never overwrites a newer decision); else None."""
    kv, _ = store.get(settings.round_key)
    if kv is None:
        return None
    current = RoundState.decode(kv.key, kv.value)
    if current.number != number or current.is_open:
        return None
    return current, kv.mod_revision


AMEND_TRIES = 16  # each lost try means another member's amendment went in


def open_next_round(store: Store, settings: Settings, reason: str, after: int,
                    left_out: tuple[str, ...] = ()) -> bool:
    """Open round ``after + 1`` unless someone already moved past ``after``."""
    found = _closed(store, settings, after)
    return found is not None and open_round_after(store, settings, *found, reason, left_out)


def open_round_after(store: Store, settings: Settings, current: RoundState, mod_revision: int,
                     reason: str, left_out: tuple[str, ...] = ()) -> bool:
    """Open the round after ``current`` if the round key still holds the record read at
    ``mod_revision``; False when someone else changed it first."""
    opened = store.replace(settings.round_key, decide.next_round(current, reason, left_out).encode(),
                           mod_revision) is not None
    if opened:
        log.info("opened round %d: %s", current.number + 1, reason)
    return opened


def amend_round(store: Store, settings: Settings, number: int, change: Callable[[RoundState], RoundState]) -> bool:
    """Change the closed round ``number`` in place (a stop asked for, a stop step) if it is
    still the current one: read fresh, compare-and-swap. False when it moved on first.

    A lost compare-and-swap while the round is still ``number`` means another member amended
    it at the same moment (two nodes leaving, a leave during a grow): read again and apply
    ``change`` to what they wrote. The changes merge (a stop asked for stays asked, the first
    stop step stands), so concurrent planned changes end with one stop step, not two."""
    for _ in range(AMEND_TRIES):
        found = _closed(store, settings, number)
        if found is None:
            return False
        current, mod_revision = found
        changed = change(current)
        if changed == current:
            return True
        if store.replace(settings.round_key, changed.encode(), mod_revision) is not None:
            return True
    return False  # amended by others this often in a row: treat it as moved on


def announce_stop(store: Store, settings: Settings, number: int, step: int) -> int | None:
    """Announce on closed round ``number`` the step every rank stops after (the first
    announcement stands). Returns the standing step, None when the round moved on."""
    if not amend_round(store, settings, number, lambda r: decide.with_stop(r, step)):
        return None
    kv, _ = store.get(settings.round_key)
    current = RoundState.decode(kv.key, kv.value) if kv is not None else None
    return current.stop_at if current is not None and current.number == number else None


@dataclass(frozen=True)
class PlannedStop:
    """The planned stop of closed round ``number``, as member ``node_id`` takes part in it:
    the initiator asks for it; every member answers the last step its workers may start
    (they start none past it until told the stop); the initiator announces the furthest."""

    store: Store
    settings: Settings
    number: int
    node_id: str

    def ask(self) -> bool:
        """RoundState.stop_asked on the round. False when the round moved on."""
        return amend_round(self.store, self.settings, self.number, decide.with_stop_asked)

    def answer(self, step: int) -> None:
        self.store.put(f"{self.settings.cleared_prefix(self.number)}{self.node_id}", str(step).encode())

    def answers(self) -> dict[str, int]:
        """Node id -> its answer, for the members that answered (an unreadable one did not)."""
        prefix = self.settings.cleared_prefix(self.number)
        kvs, _ = self.store.get_prefix(prefix)
        answers: dict[str, int] = {}
        for kv in kvs:
            try:
                answers[kv.key[len(prefix):]] = int(kv.value)
            except ValueError:
                log.warning("ignoring %s: %r is not a step", kv.key, kv.value[:40])
        return answers

    def await_answers(self, members: set[str], timeout: float) -> tuple[dict[str, int], bool]:
        """The answers, waiting up to ``timeout`` for every member's (answers.await_answers)."""
        return await_answers(self.store, self.settings, self.number, members, timeout)

    def announce(self, step: int) -> int | None:
        """The step every rank stops after (rounds.announce_stop): the standing one."""
        return announce_stop(self.store, self.settings, self.number, step)


class MemberWatch:
    """A watch on one member's presence key (rendezvous.protocol.presence); its deletion (the member went
    silent, or left) opens the round after ``after``. The watch belongs to the inbox's
    current phase and ends with it."""

    def __init__(self, store: Store, settings: Settings, inbox: Inbox) -> None:
        self.store = store
        self.settings = settings
        self.inbox = inbox
        self.node_id = ""  # "": nobody to watch (a lone member)
        self.after = 0
        self._phase_gen: int | None = None

    @property
    def armed(self) -> bool:
        """Set up in the current phase (possibly on nobody)."""
        return self._phase_gen == self.inbox.phase_gen

    def watch(self, node_id: str | None, after: int) -> None:
        # Armed before the read: if it fails, the caller re-syncs, which ends the phase.
        self.node_id, self.after, self._phase_gen = node_id or "", after, self.inbox.phase_gen
        if not node_id:
            return
        key = self.settings.presence_key(node_id)
        kv, rev = self.store.get(key)
        if kv is None:  # gone before we looked
            self._lost()
            return
        self.inbox.watch(key, ItemKind.MEMBER, rev + 1)

    def apply(self, item: InboxItem) -> None:
        if any(ev.kind == DELETE for ev in item.events):
            log.warning("member %s went silent (no presence); opening round %d", self.node_id, self.after + 1)
            self._lost()

    def _lost(self) -> None:
        open_next_round(self.store, self.settings, reason_text(Reason.NODE_LOST, self.node_id), self.after)
