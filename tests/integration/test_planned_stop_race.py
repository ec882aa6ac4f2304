"""Two planned changes at once (two nodes leaving, a leave during a grow) against a real etcd:
both initiators ask for the stop and announce a step at the same moment, and the job ends
with one stop step that both of them report, not two."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rendezvous.etcd.store import EtcdStore
from rendezvous.protocol.rounds import PlannedStop
from rendezvous.settings import Settings
from rendezvous.state import Assignment, Member, RoundPhase, RoundState


class CutIn:
    """A store whose first compare-and-swap is preceded by ``other`` (another member's write
    landing between our read and our write: the race, made to happen every time)."""

    def __init__(self, store: EtcdStore, other: Callable[[], Any]) -> None:
        self._store, self._other = store, other

    def replace(self, *args: Any, **kw: Any) -> int | None:
        other, self._other = self._other, None
        if other is not None:
            other()
        return self._store.replace(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@contextmanager
def two_stores(etcd) -> Iterator[tuple[EtcdStore, EtcdStore]]:
    """Two members' own connections to etcd."""
    a, b = EtcdStore(etcd.endpoint), EtcdStore(etcd.endpoint)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def closed_round(store: EtcdStore, settings: Settings) -> None:
    members = tuple(Member(f"node-{i}", "127.0.0.1", 1) for i in range(3))
    rnd = RoundState(2, RoundPhase.CLOSED, assignment=Assignment(2, members, "127.0.0.1", 29500))
    store.put(settings.round_key, rnd.encode())


def current(store: EtcdStore, settings: Settings) -> RoundState:
    kv, _ = store.get(settings.round_key)
    assert kv is not None
    return RoundState.decode(kv.key, kv.value)


def test_two_nodes_asking_for_a_stop_at_once_both_join_one_stop(etcd, job_id):
    settings = Settings(job_id=job_id, min_nodes=1, max_nodes=3)
    with two_stores(etcd) as (a_store, b_store):
        closed_round(a_store, settings)
        b = PlannedStop(b_store, settings, 2, "node-2")
        a = PlannedStop(CutIn(a_store, b.ask), settings, 2, "node-1")
        assert a.ask(), "the second asker was told the round moved on: its stop was never asked"
        assert current(a_store, settings).stop_asked


def test_two_nodes_announcing_a_stop_at_once_get_the_same_step(etcd, job_id):
    settings = Settings(job_id=job_id, min_nodes=1, max_nodes=3)
    with two_stores(etcd) as (a_store, b_store):
        closed_round(a_store, settings)
        b = PlannedStop(b_store, settings, 2, "node-2")
        b_said: list[int | None] = []
        a = PlannedStop(CutIn(a_store, lambda: b_said.append(b.announce(7))), settings, 2, "node-1")
        a_said = a.announce(9)
        assert b_said == [7]
        assert a_said == 7, f"node-1 stops after {a_said}, node-2 after 7: two stop steps"
        assert current(a_store, settings).stop_at == 7
