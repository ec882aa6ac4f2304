"""Fencing that holds on a black-holed link: a thread that never waits on etcd or a file.

The lease's local deadline (rendezvous.protocol.session: when the last refresh was sent, plus the TTL,
minus a margin) is plain arithmetic. This thread checks it every ``POLL`` seconds and, once it
has passed, signals the running workers' process groups itself: SIGTERM, then SIGKILL after
--abort-timeout (a lost lease is an unplanned loss: no handler needs the longer grace). The agent's loop may meanwhile be stuck in a request to an unreachable
etcd (each attempt waits its full timeout) or in a read of a hung network filesystem; the
workers are stopped all the same, before etcd can expire the lease and let the others run a
newer round without us. The loop, once it notices, does the bookkeeping and rejoins.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from rendezvous.clock import Clock
from rendezvous.protocol.session import Session

log = logging.getLogger("elastic_agent")

POLL = 0.1


class FenceGuard:
    """``session()`` gives the current lease session; ``pgids()`` the process groups of the
    workers running now (both read without locks: a stale answer is corrected next poll)."""

    def __init__(self, session: Callable[[], Session | None], pgids: Callable[[], list[int]],
                 shutdown_timeout: float, clock: Clock) -> None:
        self._session = session
        self._pgids = pgids
        self._grace = shutdown_timeout
        self._clock = clock
        self._stop = threading.Event()
        self._fenced_lease = 0  # the lease we last fenced for: once per lease
        self._terminated: tuple[float, list[int]] | None = None
        self.fences = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="fence-guard")

    def start(self) -> FenceGuard:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def tick(self, now: float) -> None:
        """Fence if the lease's deadline has passed; SIGKILL what SIGTERM left after the grace."""
        session = self._session()
        if session is not None and session.lease and session.lease != self._fenced_lease:
            if session.lost.is_set() or now >= session.deadline:
                self._fenced_lease = session.lease
                pgids = self._pgids()
                self.fences += 1
                log.error("lease %x past its deadline: fencing %d worker process groups now", session.lease,
                          len(pgids))
                self._terminated = (now, pgids)
                _signal(pgids, signal.SIGTERM)
        if self._terminated is not None and now - self._terminated[0] >= self._grace:
            _signal(self._terminated[1], signal.SIGKILL)
            self._terminated = None

    def _run(self) -> None:
        while not self._stop.wait(POLL):
            try:
                self.tick(self._clock.monotonic())
            except Exception:  # noqa: BLE001 - the guard must outlive any surprise
                log.exception("fence guard")


def _signal(pgids: list[int], sig: signal.Signals) -> None:
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
