"""The etcd c10d store's compare-and-swap loops (``add``, ``compare_set``, ``append``) back off
with jitter after a lost race: at torch's exit barrier every agent adds to one counter at
once, and retrying at once costs O(N^2) transactions. A store that loses the first races."""

from __future__ import annotations

from rendezvous.clock import FakeClock
from rendezvous.memory_store import MemoryStore
from rendezvous.settings import Settings
from rendezvous.torchrun.c10d_store import BACKOFF_FIRST_S, BACKOFF_MAX_S, RoundKeys


class Contended(MemoryStore):
    """Loses the first ``losses`` compare-and-swaps (another agent got there first)."""

    def __init__(self, clock: FakeClock, losses: int) -> None:
        super().__init__(clock, reap_interval=None)
        self.losses = losses
        self.attempts = 0

    def replace(self, key, value, mod_revision, lease=0):
        self.attempts += 1
        if self.attempts <= self.losses:
            return None
        return super().replace(key, value, mod_revision, lease)


class RecordingClock(FakeClock):
    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        super().sleep(seconds)


def keys(losses: int) -> tuple[RoundKeys, Contended, RecordingClock]:
    clock = RecordingClock()
    store = Contended(clock, losses)
    return RoundKeys(store, Settings("job", 1, 4), 1, clock), store, clock


def test_an_add_that_loses_races_waits_a_jittered_doubling_window_before_each_retry() -> None:
    round_keys, store, clock = keys(losses=12)
    assert round_keys.add("barrier", 1) == 1
    assert store.attempts == 13
    assert len(clock.sleeps) == 12  # one wait per lost race, none before the first try
    for lost, slept in enumerate(clock.sleeps, start=1):
        assert 0.0 <= slept <= min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (lost - 1))
    assert len(set(clock.sleeps)) > 1  # jitter: agents that lost together do not retry together


def test_compare_set_and_append_back_off_too_and_an_uncontended_one_never_waits() -> None:
    round_keys, store, clock = keys(losses=3)
    assert round_keys.compare_set("k", b"", b"v") == b"v"
    assert len(clock.sleeps) == 3
    round_keys.append("log", b"a")
    assert len(clock.sleeps) == 3  # the race was won at once: no wait
