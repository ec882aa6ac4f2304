"""A session: one lease, a keep-alive loop, and a "lost" signal (etcd's concurrency.Session).

The lease is kept alive every ``ttl/3``. A failed refresh is retried until the lease's
deadline: measured from when the last successful refresh was *sent*, so we declare the
lease lost no later than etcd can expire it. Whoever holds the session fences on ``lost``.
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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Session:
        sent = self.clock.monotonic()
        self.lease = self.store.grant(self.ttl)
        self._deadline = sent + self.ttl - self.margin
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"lease-{self.lease:x}")
        self._thread.start()
        return self

    @property
    def deadline(self) -> float:
        """Monotonic time by which etcd may have expired the lease if nothing more succeeds."""
        return self._deadline

    def _run(self) -> None:
        interval = self.ttl / 3
        next_at = self.clock.monotonic() + interval
        while not self._stop.is_set():
            now = self.clock.monotonic()
            if now >= self._deadline:
                self._lose(f"lease {self.lease:x} not refreshed for {self.ttl - self.margin:.1f}s of its "
                           f"{self.ttl:.0f}s TTL (cut off from etcd)")
                return
            if self._stop.wait(max(0.0, min(next_at, self._deadline) - now)):
                return
            if self.clock.monotonic() < next_at:
                continue
            sent = self.clock.monotonic()
            try:
                self.store.keepalive(self.lease)
            except LeaseLostError as exc:
                self._lose(str(exc))
                return
            except RendezvousError as exc:
                log.warning("lease %x refresh failed (%s); retrying until its deadline", self.lease, exc)
                next_at = self.clock.monotonic() + self.retry_interval
                continue
            self._deadline = sent + self.ttl - self.margin
            next_at = sent + interval

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

    def revoke(self) -> None:
        """Stop refreshing and revoke: every key on the lease disappears at once."""
        self.close()
        if self.lease and not self.lost.is_set():
            try:
                self.store.revoke(self.lease)
            except RendezvousError as exc:
                log.warning("could not revoke lease %x (%s); it expires within %ss", self.lease, exc, self.ttl)
