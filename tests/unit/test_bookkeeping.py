"""How often a node writes its goodput record to etcd: on a change (soon, not at once) and
otherwise rarely, because every write is history etcd keeps until it compacts (1,024 nodes
writing every 10 s filled etcd's default 2 GB quota within a day)."""

from __future__ import annotations

from agent.common.states import State
from agent.daemon.bookkeeping import SYNC_ON_CHANGE, Bookkeeping
from agent.observe.collectors import CheckpointCollector
from agent.observe.goodput import goodput_key
from agent.observe.metrics import AgentMetrics
from rendezvous.clock import FakeClock
from rendezvous.memory_store import MemoryStore
from rendezvous.settings import Settings

SETTINGS = Settings(job_id="job", min_nodes=1, max_nodes=2)
TICK = 0.125  # about the loop's --monitor-interval (0.1 s); exact in binary, so no drift over an hour


class CountingStore(MemoryStore):
    """Counts the writes of one key."""

    def __init__(self, key: str) -> None:
        super().__init__(reap_interval=None)
        self.key, self.writes = key, 0

    def commit(self, compares, puts, lease=0, reads=()):
        self.writes += sum(1 for key, _ in puts if key == self.key)
        return super().commit(compares, puts, lease=lease, reads=reads)


def books() -> tuple[Bookkeeping, AgentMetrics, CountingStore, FakeClock]:
    clock = FakeClock()
    store = CountingStore(goodput_key(SETTINGS, "n0"))
    metrics = AgentMetrics("job", "n0", clock=clock.monotonic)
    checkpoints = CheckpointCollector(None, metrics.labels, clock=clock.monotonic)
    return Bookkeeping(store, SETTINGS, "n0", metrics, checkpoints, clock), metrics, store, clock


def run_for(b: Bookkeeping, clock: FakeClock, seconds: float) -> None:
    for _ in range(round(seconds / TICK)):
        clock.advance(TICK)
        b.tick()


def test_a_steady_node_writes_its_record_once_a_minute() -> None:
    b, metrics, store, clock = books()
    metrics.state(State.RUNNING)
    b.tick()  # the first pass writes at once
    assert store.writes == 1
    run_for(b, clock, 3600)
    # Once a minute: 61 an hour, where every 10 s was 361 (the promise in bookkeeping.py's
    # docstring, so it is written out here, not read from SYNC_EVERY).
    assert store.writes == 61
    store.close()


def test_a_state_change_is_written_within_seconds_and_a_flapping_one_at_most_every_few() -> None:
    b, metrics, store, clock = books()
    metrics.state(State.RUNNING)
    b.tick()
    run_for(b, clock, 20)
    assert store.writes == 1
    metrics.state(State.RESTARTING)
    run_for(b, clock, SYNC_ON_CHANGE + TICK)
    assert store.writes == 2  # the change is in etcd within SYNC_ON_CHANGE of the last write
    flips = [State.RUNNING, State.RESTARTING] * 30
    for state in flips:  # a state flipping every 0.5 s for 30 s
        metrics.state(state)
        run_for(b, clock, 0.5)
    assert 2 < store.writes <= 2 + 30 / SYNC_ON_CHANGE + 1
    store.close()
