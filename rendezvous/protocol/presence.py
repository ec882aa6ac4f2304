"""A node's presence: ``presence/<node-id>`` on a short lease of its own, kept alive often.

Its peers watch this key, not the node's membership key: a node that goes silent (frozen,
its link cut, its machine reclaimed without a word) is noticed within ``presence_ttl``
seconds, while fencing keeps the longer ``lease_ttl`` (a short etcd hiccup must not stop
anyone's workers). Being declared absent costs a node nothing but a restart: when it speaks
again it takes a new lease and puts its key back, and joins the next round like any node.

etcd extends every lease by an election timeout when a new leader takes over, so a leader
election does not make present nodes absent.
"""

from __future__ import annotations

import logging
import threading

from rendezvous.clock import Clock, SystemClock
from rendezvous.errors import LeaseLostError, RendezvousError
from rendezvous.store import Store

log = logging.getLogger(__name__)

REFRESHES_PER_TTL = 4  # a refresh every ttl/4: three may fail before etcd drops the key


class Presence:
    def __init__(self, store: Store, key: str, ttl: float, clock: Clock | None = None) -> None:
        self.store = store
        self.key = key
        self.ttl = ttl
        self.clock = clock or SystemClock()
        self.lease = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = threading.RLock()  # held by a step in progress: close() waits for it

    @property
    def interval(self) -> float:
        return self.ttl / REFRESHES_PER_TTL

    def start(self, *, background: bool = True) -> Presence:
        """Put the key (raises when etcd does not answer), then keep it alive on a thread.
        ``background=False``: no thread; the caller calls :meth:`step` from ``interval`` on."""
        self._establish()
        if background:
            self._thread = threading.Thread(target=self._run, daemon=True, name="presence")
            self._thread.start()
        return self

    def _establish(self) -> None:
        lease = self.store.grant(self.ttl)
        self.store.put(self.key, b"", lease=lease)
        self.lease = lease

    def tick(self) -> None:
        """One refresh; a lease etcd already dropped is taken anew and the key put back."""
        try:
            self.store.keepalive(self.lease)
        except LeaseLostError:
            log.warning("presence lease %x expired (this node was silent for %.0fs); present again",
                        self.lease, self.ttl)
            self._establish()

    def step(self, now: float) -> float | None:
        """One refresh, its failure logged; when to step next (None once closed)."""
        with self._busy:
            if self._stop.is_set():
                return None
            try:
                self.tick()
            except RendezvousError as exc:
                log.debug("presence refresh failed (%s); retrying", exc)
            return self.clock.monotonic() + self.interval

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.step(self.clock.monotonic())

    def close(self, revoke: bool = False) -> None:
        """Stop refreshing; with ``revoke``, remove the key at once (a node leaving)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        elif self._busy.acquire(timeout=5):  # stepped by a Ticker, perhaps right now
            self._busy.release()
        if revoke and self.lease:
            try:
                self.store.revoke(self.lease)
            except RendezvousError as exc:
                log.debug("could not revoke presence lease %x (%s)", self.lease, exc)
