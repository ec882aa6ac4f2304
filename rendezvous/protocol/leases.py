"""A node's two leases: membership (``nodes/<id>`` and its join keys; lost => fence) and
presence (``presence/<id>``; what peers watch). See rendezvous.protocol.session and rendezvous.protocol.presence."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from rendezvous.clock import Clock
from rendezvous.protocol.presence import Presence
from rendezvous.protocol.session import Session
from rendezvous.settings import Settings
from rendezvous.store import Store

# The lease is declared lost this long before etcd could expire it. The agent fences from a
# thread of its own that never blocks on etcd, so this covers only that thread's poll and
# the signals it sends, not a request in flight.
FENCE_MARGIN = 1.0


class Ticker(Protocol):
    """Drives many leases' refreshes from one place instead of a thread per lease (the scale
    simulator runs thousands of nodes in a few processes: tests/bench/rdzv_sim_ticker.py)."""

    def add(self, step: Callable[[float], float | None], at: float) -> None:
        """Call ``step(now)`` at ``at``, then again at each time it returns, until None."""


class NodeLeases:
    def __init__(self, store: Store, settings: Settings, node_id: str, clock: Clock,
                 on_lost: Callable[[str], None], ticker: Ticker | None = None) -> None:
        """``ticker``: refresh both leases from it; None, each from a thread of its own (an agent)."""
        self.store, self.settings, self.node_id, self.clock = store, settings, node_id, clock
        self.on_lost = on_lost
        self.ticker = ticker
        self.session: Session | None = None
        self.presence: Presence | None = None

    def start(self) -> Session:
        """Present first (peers never see a member without it), then a new membership lease."""
        own_threads = self.ticker is None
        if self.presence is None:
            self.presence = Presence(self.store, self.settings.presence_key(self.node_id),
                                     self.settings.presence_ttl, self.clock).start(background=own_threads)
            if self.ticker is not None:
                self.ticker.add(self.presence.step, self.clock.monotonic() + self.presence.interval)
        self.session = Session(self.store, self.settings.lease_ttl, self.clock, margin=FENCE_MARGIN,
                               on_lost=self.on_lost).start(background=own_threads)
        if self.ticker is not None:
            self.ticker.add(self.session.tick, self.clock.monotonic())
        return self.session

    def close(self, revoke: bool) -> None:
        """Stop refreshing; with ``revoke`` every key on both leases disappears at once."""
        if self.session is not None:
            self.session.revoke() if revoke else self.session.close()
        if self.presence is not None:
            self.presence.close(revoke=revoke)
            self.presence = None
