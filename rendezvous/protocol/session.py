"""A session: one lease, a keep-alive loop, and a "lost" signal (etcd's concurrency.Session).

The lease is kept alive every ``ttl/3``. A failed refresh is retried until the lease's
deadline: measured from when the last successful refresh was *sent*, so we declare the
lease lost no later than etcd can expire it. Whoever holds the session fences on ``lost``.

What is due at a given moment is :meth:`Session.tick`'s business; the thread only sleeps
until the time it returns, so tests drive ``tick`` with a fake clock instead.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from rendezvous.clock import Clock, SystemClock
from rendezvous.errors import LeaseLostError, RendezvousError
from rendezvous.store import Store

log = logging.getLogger(__name__)


class Session:
    def __init__(self, store: Store, ttl: float, clock: Clock | None = None,
                 on_lost: Callable[[str], None] | None = None, retry_interval: float = 0.5,
                 margin: float = 0.0) -> None:
        self.store = store
        self.ttl = ttl
        self.refresh_interval = ttl / 3
        # Declare the lease lost this much before etcd could expire it, so whoever fences
        # (and may be blocked in a request for up to the store's retry time) is still early.
        self.margin = min(max(0.0, margin), ttl / 2)
        self.clock = clock or SystemClock()
        self.on_lost = on_lost
        self.retry_interval = retry_interval
        self.lease = 0
        self.lost = threading.Event()
        self.lost_reason = ""
        self._deadline = 0.0
        self._next_refresh = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Held by a tick in progress: close() waits for it, as it joins our own thread, so no
        # refresh of a closed session is still in flight when its caller revokes the lease.
        self._busy = threading.RLock()

    def start(self, *, background: bool = True) -> Session:
        """Take the lease. ``background=False``: no thread; the caller calls :meth:`tick`."""
        sent = self.clock.monotonic()
        self.lease = self.store.grant(self.ttl)
        self._deadline = sent + self.ttl - self.margin
        self._next_refresh = self.clock.monotonic() + self.refresh_interval
        if background:
            self._thread = threading.Thread(target=self._run, daemon=True, name=f"lease-{self.lease:x}")
            self._thread.start()
        return self

    @property
    def deadline(self) -> float:
        """Monotonic time by which etcd may have expired the lease if nothing more succeeds."""
        return self._deadline

    def tick(self, now: float) -> float | None:
        """Do what is due at ``now``: declare the lease lost past its deadline, or refresh it
        when a refresh is due. Returns when to tick next; None once the session is over."""
        with self._busy:
            return self._tick(now)

    def _tick(self, now: float) -> float | None:
        if self._stop.is_set() or self.lost.is_set():
            return None
        if now >= self._deadline:
            self._lose(f"lease {self.lease:x} not refreshed for {self.ttl - self.margin:.1f}s of its "
                       f"{self.ttl:.0f}s TTL (cut off from etcd)")
            return None
        if now >= self._next_refresh:
            self._refresh(sent=now)
            if self.lost.is_set():
                return None
        return min(self._next_refresh, self._deadline)

    def _refresh(self, sent: float) -> None:
        try:
            self.store.keepalive(self.lease)
        except LeaseLostError as exc:
            self._lose(str(exc))
            return
        except RendezvousError as exc:
            log.warning("lease %x refresh failed (%s); retrying until its deadline", self.lease, exc)
            self._next_refresh = self.clock.monotonic() + self.retry_interval
            return
        self._deadline = sent + self.ttl - self.margin
        self._next_refresh = sent + self.refresh_interval

    def _run(self) -> None:
        wake = self.tick(self.clock.monotonic())
        while wake is not None:
            if self._stop.wait(max(0.0, wake - self.clock.monotonic())):
                return
            wake = self.tick(self.clock.monotonic())

    def _lose(self, reason: str) -> None:
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()
        log.warning("session lost: %s", reason)
        if self.on_lost is not None:
            self.on_lost(reason)

    def close(self) -> None:
        """Stop refreshing without revoking (the lease then expires on its own)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        elif self._busy.acquire(timeout=5):  # ticked by a Ticker, perhaps right now
            self._busy.release()

    def revoke(self) -> None:
        """Stop refreshing and revoke: every key on the lease disappears at once."""
        self.close()
        if self.lease and not self.lost.is_set():
            try:
                self.store.revoke(self.lease)
            except RendezvousError as exc:
                log.warning("could not revoke lease %x (%s); it expires within %ss", self.lease, exc, self.ttl)
