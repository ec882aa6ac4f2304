"""A node's two leases refreshed from a ticker (rendezvous.protocol.leases.Ticker) instead of a thread
each: what the scale simulator runs thousands of nodes with. The refreshes must be the ones
an agent sends, and closing a node must stop them as joining its threads does.
"""

from __future__ import annotations

import threading

from rendezvous.clock import FakeClock
from rendezvous.errors import LeaseLostError
from rendezvous.memory_store import MemoryStore
from rendezvous.protocol.leases import NodeLeases
from rendezvous.protocol.presence import Presence
from rendezvous.settings import Settings
from tests.waiting import wait_until

SETTINGS = Settings(job_id="job", min_nodes=1, max_nodes=4, lease_ttl=9.0, presence_ttl=2.0)


class ListTicker:
    """Records what it is given; the test calls the steps."""

    def __init__(self) -> None:
        self.steps: list[tuple[object, float]] = []

    def add(self, step, at: float) -> None:  # noqa: ANN001 - rendezvous.protocol.leases.Ticker
        self.steps.append((step, at))


def test_leases_on_a_ticker_start_no_thread_and_refresh_as_an_agent_does() -> None:
    clock = FakeClock()
    store = MemoryStore(clock, reap_interval=None)
    ticker = ListTicker()
    before = threading.active_count()
    leases = NodeLeases(store, SETTINGS, "n1", clock, on_lost=lambda _: None, ticker=ticker)
    session = leases.start()
    assert threading.active_count() == before
    (presence_step, presence_at), (session_step, session_at) = ticker.steps
    assert presence_at == clock.monotonic() + 0.5  # presence: every ttl/4
    assert session_at == clock.monotonic()
    assert session_step(clock.monotonic()) == clock.monotonic() + 3.0  # membership: every ttl/3
    clock.advance(3.0)
    sent = store.requests.snapshot().get("lease_keepalive", 0)
    assert presence_step(clock.monotonic()) == clock.monotonic() + 0.5
    assert session_step(clock.monotonic()) == clock.monotonic() + 3.0
    assert store.requests.snapshot()["lease_keepalive"] == sent + 2
    assert store.get(SETTINGS.presence_key("n1"))[0] is not None and not session.lost.is_set()
    leases.close(revoke=True)
    assert presence_step(clock.monotonic()) is None and session_step(clock.monotonic()) is None
    assert store.get(SETTINGS.presence_key("n1"))[0] is None


class GatedStore(MemoryStore):
    """A keep-alive that waits for the test's go, then finds the lease revoked under it."""

    def __init__(self) -> None:
        super().__init__(reap_interval=None)
        self.entered = threading.Event()
        self.go = threading.Event()

    def keepalive(self, lease: int) -> float:
        self.entered.set()
        assert self.go.wait(10)
        raise LeaseLostError(f"lease {lease:x} expired or was revoked")


def test_a_node_that_left_stays_absent_though_a_refresh_was_in_flight() -> None:
    # A node leaves (close, revoke) while the ticker is in the middle of its presence refresh.
    # The refresh then finds the lease gone and would take a new one and put the key back:
    # the node would look present after it left. close() waits for the refresh in flight.
    store = GatedStore()
    key = SETTINGS.presence_key("n1")
    presence = Presence(store, key, 2.0).start(background=False)
    refresh = threading.Thread(target=presence.step, args=(0.0,))
    refresh.start()
    assert store.entered.wait(10)
    leaving = threading.Thread(target=presence.close, kwargs={"revoke": True})
    leaving.start()
    leaving.join(timeout=0.3)  # without the wait, close() and its revoke are over by now
    store.go.set()
    refresh.join(timeout=10)
    leaving.join(timeout=10)
    wait_until(lambda: not refresh.is_alive() and not leaving.is_alive(), 10, "the refresh and the leave")
    assert store.get(key)[0] is None, "the presence key came back after the node left"
