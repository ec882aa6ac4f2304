"""The participant's inbox: every watch event and lease loss, queued for one thread.

Store callbacks run on the store's threads and must only enqueue; the participant takes items
off on its own thread, so its state changes in one place.

A cancelled watch may still have items in flight. Two generations tell them apart:
- the *watch* generation moves on when every watch is cancelled (a re-sync, a rejoin);
- the *phase* generation moves on when the watches of one phase (following a joiner,
  coordinating a round, watching a member) are cancelled together, while the watches of the
  round and status keys stay.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from enum import Enum

from rendezvous.errors import RendezvousError
from rendezvous.store import Event, Store, Watch


class ItemKind(Enum):
    ROUND = "round"  # the round key changed
    STATUS = "status"  # the job's outcome was written
    PREDECESSOR = "predecessor"  # the joiner just before us (we follow it)
    JOINED = "joined"  # someone joined or left the round we coordinate
    NODES = "nodes"  # a node registered or its key vanished (we coordinate)
    MEMBER = "member"  # the member whose loss we watch for
    WATCH_FAILED = "watch_failed"  # a watch died: what we hold may be stale
    LEASE_LOST = "lease_lost"  # our session gave up on the lease
    WAKE = "wake"  # the caller has something to look at: end the wait now


PHASE_KINDS = frozenset({ItemKind.PREDECESSOR, ItemKind.JOINED, ItemKind.NODES, ItemKind.MEMBER})


@dataclass(frozen=True)
class InboxItem:
    kind: ItemKind
    watch_gen: int
    phase_gen: int | None = None  # set on items from phase watches
    events: tuple[Event, ...] = ()
    error: Exception | None = None  # WATCH_FAILED
    reason: str = ""  # LEASE_LOST


class Inbox:
    def __init__(self, store: Store) -> None:
        self._store = store
        # A SimpleQueue, not a Queue: wake() runs in a signal handler, which can land while the
        # loop is inside get(). Queue.put takes the non-reentrant lock get() may hold (the agent
        # then hangs for good while its lease threads keep the node "alive"); SimpleQueue.put is
        # reentrant in CPython (documented as safe from signal handlers).
        self._queue: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
        self.watch_gen = 0
        self.phase_gen = 0
        self._lasting: list[Watch] = []  # the round and status watches
        self._phase: list[Watch] = []

    def watch(self, key: str, kind: ItemKind, start_revision: int, prefix: bool = False) -> None:
        """Watch ``key`` from ``start_revision`` on; its events arrive as items of ``kind``.
        A watch of a phase kind ends with the phase."""
        watch_gen = self.watch_gen
        phase_gen = self.phase_gen if kind in PHASE_KINDS else None

        def on_events(events: list[Event]) -> None:
            self._queue.put(InboxItem(kind, watch_gen, phase_gen, events=tuple(events)))

        def on_error(exc: Exception) -> None:
            # Not tied to the phase: a failed watch means the shared stream broke.
            self._queue.put(InboxItem(ItemKind.WATCH_FAILED, watch_gen, error=exc))

        watch = self._store.watch(key, on_events, on_error, start_revision, prefix=prefix)
        (self._lasting if phase_gen is None else self._phase).append(watch)

    def lease_lost(self, reason: str) -> None:
        """Called by the session's thread; never stale, whatever was cancelled since."""
        self._queue.put(InboxItem(ItemKind.LEASE_LOST, -1, reason=reason))

    def wake(self) -> None:
        """End a wait at once. Safe from a signal handler: one reentrant SimpleQueue put."""
        self._queue.put(InboxItem(ItemKind.WAKE, -1))

    def get(self, timeout: float) -> InboxItem | None:
        try:
            return self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def is_stale(self, item: InboxItem) -> bool:
        """From a watch cancelled since it was queued."""
        if item.kind is ItemKind.LEASE_LOST:
            return False
        return item.watch_gen != self.watch_gen or (item.phase_gen is not None and item.phase_gen != self.phase_gen)

    def end_phase(self) -> None:
        _cancel(self._phase)
        self.phase_gen += 1

    def cancel_all(self) -> None:
        self.end_phase()
        _cancel(self._lasting)
        self.watch_gen += 1

    def clear(self) -> None:
        """Drop everything queued (after a rejoin nothing queued before applies)."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return


def _cancel(watches: list[Watch]) -> None:
    for watch in watches:
        try:
            watch.cancel()
        except RendezvousError:
            pass  # a watch on a broken stream is gone already
    watches.clear()
