"""rendezvous.protocol.session: the keep-alive arithmetic, driven by ``tick(now)`` on a fake clock.

The store is a recording fake whose keep-alive answers are scripted; nothing here sleeps,
except the last test, which checks that the background thread only runs ``tick``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from rendezvous.clock import FakeClock, SystemClock
from rendezvous.errors import LeaseLostError, StoreUnavailableError
from rendezvous.protocol.session import Session
from tests.waiting import wait_until

T0 = 1000.0  # FakeClock's start
LEASE = 0x7


class FakeStore:
    """Grants lease 7; each keep-alive runs the next scripted answer (the last one repeats)."""

    def __init__(self, clock: FakeClock, *answers: Callable[[], None]) -> None:
        self.clock = clock
        self.answers = list(answers) or [ok]
        self.keepalives: list[float] = []  # when each was sent
        self.revokes: list[int] = []
        self.revoke_error: Exception | None = None

    def grant(self, ttl: float) -> int:
        return LEASE

    def keepalive(self, lease: int) -> float:
        assert lease == LEASE
        self.keepalives.append(self.clock.monotonic())
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        answer()
        return 9.0

    def revoke(self, lease: int) -> None:
        self.revokes.append(lease)
        if self.revoke_error is not None:
            raise self.revoke_error


def ok() -> None:
    pass


def unavailable() -> None:
    raise StoreUnavailableError("etcd keep-alive stream lost")


def lease_gone() -> None:
    raise LeaseLostError("lease 7 expired or was revoked")


def session(store: FakeStore, ttl: float = 9.0, margin: float = 0.0) -> tuple[Session, list[str]]:
    lost: list[str] = []
    s = Session(store, ttl, store.clock, on_lost=lost.append, retry_interval=0.5, margin=margin)
    return s.start(background=False), lost


def at(clock: FakeClock, when: float) -> float:
    """Move the clock to ``when``, for a tick at that time."""
    clock.advance(when - clock.monotonic())
    return when


def run_until_over(s: Session, clock: FakeClock, limit: float = 100.0) -> None:
    """What the thread does, on the fake clock: tick, sleep until the time it asks for, repeat."""
    wake = s.tick(clock.monotonic())
    while wake is not None:
        assert wake < T0 + limit, "the session never ended"
        clock.advance(max(0.0, wake - clock.monotonic()))
        wake = s.tick(clock.monotonic())


def test_refreshes_every_third_of_the_ttl() -> None:
    clock = FakeClock()
    store = FakeStore(clock)
    s, lost = session(store)
    assert s.tick(T0) == T0 + 3.0  # nothing due yet
    assert store.keepalives == []
    assert s.tick(at(clock, T0 + 3.0)) == T0 + 6.0
    assert s.tick(at(clock, T0 + 6.0)) == T0 + 9.0
    assert store.keepalives == [T0 + 3.0, T0 + 6.0]
    assert s.deadline == T0 + 6.0 + 9.0 and not lost


def test_the_deadline_runs_from_when_the_refresh_was_sent_minus_the_margin() -> None:
    clock = FakeClock()

    def slow() -> None:
        clock.advance(2.0)  # etcd answers two seconds later

    s, _ = session(FakeStore(clock, slow), margin=1.0)
    assert s.deadline == T0 + 9.0 - 1.0
    s.tick(at(clock, T0 + 3.0))
    assert s.deadline == T0 + 3.0 + 9.0 - 1.0  # not from the answer at T0 + 5
    assert s.tick(clock.monotonic()) == T0 + 6.0  # the next refresh, too, counts from the send


@pytest.mark.parametrize("margin,kept", [(0.0, 0.0), (1.5, 1.5), (5.0, 5.0), (8.0, 5.0), (-1.0, 0.0)])
def test_the_margin_is_capped_at_half_the_ttl(margin: float, kept: float) -> None:
    s, _ = session(FakeStore(FakeClock()), ttl=10.0, margin=margin)
    assert s.margin == kept
    assert s.deadline == T0 + 10.0 - kept


def test_a_failed_refresh_is_retried_every_retry_interval_until_the_deadline() -> None:
    clock = FakeClock()
    store = FakeStore(clock, unavailable)
    s, lost = session(store)
    run_until_over(s, clock)
    assert store.keepalives == [T0 + 3.0 + 0.5 * i for i in range(12)]  # 3.0, 3.5, ... 8.5
    assert clock.monotonic() == T0 + 9.0
    assert lost == ["lease 7 not refreshed for 9.0s of its 9s TTL (cut off from etcd)"]
    assert s.lost.is_set() and s.lost_reason == lost[0]


def test_a_refresh_that_gets_through_before_the_deadline_extends_it() -> None:
    clock = FakeClock()
    store = FakeStore(clock, unavailable, unavailable, ok)
    s, lost = session(store, margin=1.0)
    wake = s.tick(clock.monotonic())
    for _ in range(3):
        wake = s.tick(at(clock, wake))  # type: ignore[arg-type]
    assert store.keepalives == [T0 + 3.0, T0 + 3.5, T0 + 4.0]
    assert s.deadline == T0 + 4.0 + 9.0 - 1.0 and not lost


def test_lease_lost_from_keepalive_loses_at_once() -> None:
    clock = FakeClock()
    store = FakeStore(clock, lease_gone)
    s, lost = session(store)
    assert s.tick(at(clock, T0 + 3.0)) is None  # well before the deadline
    assert lost == ["lease 7 expired or was revoked"] and s.lost_reason == lost[0]
    assert store.keepalives == [T0 + 3.0]  # no retry: the lease is gone for good


def test_on_lost_is_called_exactly_once() -> None:
    clock = FakeClock()
    store = FakeStore(clock, unavailable)
    s, lost = session(store)
    run_until_over(s, clock)
    for later in (T0 + 9.0, T0 + 20.0):
        assert s.tick(later) is None
    assert len(lost) == 1
    assert len(store.keepalives) == 12  # and nothing more is sent once lost


def test_close_stops_refreshing_without_revoking() -> None:
    clock = FakeClock()
    store = FakeStore(clock)
    s, lost = session(store)
    s.close()
    assert s.tick(T0 + 3.0) is None and s.tick(T0 + 50.0) is None
    assert store.keepalives == [] and store.revokes == []
    assert not lost  # closing is not losing


def test_revoke_revokes_the_lease_once_and_stops_refreshing() -> None:
    clock = FakeClock()
    store = FakeStore(clock)
    s, _ = session(store)
    s.revoke()
    assert store.revokes == [LEASE]
    assert s.tick(T0 + 3.0) is None and store.keepalives == []


def test_revoke_after_the_lease_was_lost_asks_nothing_of_the_store() -> None:
    clock = FakeClock()
    store = FakeStore(clock, lease_gone)
    s, _ = session(store)
    s.tick(at(clock, T0 + 3.0))
    s.revoke()
    assert store.revokes == []


def test_a_failed_revoke_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    store = FakeStore(clock)
    store.revoke_error = StoreUnavailableError("etcd unreachable")
    s, _ = session(store)
    with caplog.at_level(logging.WARNING, logger="rendezvous.protocol.session"):
        s.revoke()
    assert store.revokes == [LEASE]
    assert "could not revoke lease 7 (etcd unreachable); it expires within 9.0s" in caplog.text


def test_the_background_thread_ticks_until_closed() -> None:
    clock = FakeClock()
    store = FakeStore(clock)
    s = Session(store, 0.3, SystemClock()).start()  # refreshes every 0.1 s of real time
    wait_until(lambda: len(store.keepalives) >= 2, 5, "two refreshes")
    s.close()
    assert s._thread is not None and not s._thread.is_alive()
    sent = len(store.keepalives)
    assert s.tick(float("inf")) is None and len(store.keepalives) == sent
