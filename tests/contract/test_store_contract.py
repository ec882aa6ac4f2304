"""The store contract: every Store implementation behaves like etcd v3 where the rendezvous
relies on it. Each test runs against MemoryStore and against EtcdStore on a real etcd."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from rendezvous.errors import LeaseLostError, StoreUnavailableError
from rendezvous.etcd.server import EtcdServer
from rendezvous.etcd.store import EtcdStore
from rendezvous.memory_store import MemoryStore
from rendezvous.store import DELETE, PUT, Event
from tests.conftest import wait_until

BACKENDS = ["memory", "etcd"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store(backend: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    if backend == "memory":
        s: Any = MemoryStore()  # system clock, reaper on: leases expire in real time, as in etcd
    else:
        server: EtcdServer = request.getfixturevalue("etcd")
        s = EtcdStore(server.endpoint, retry_for=3.0)
    yield s
    s.close()


@pytest.fixture
def p(job_id: str) -> str:
    """A key prefix of this test's own."""
    return f"/contract/{job_id}/"


class Recorder:
    """Collects a watch's callbacks (they run on the store's thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[Event] = []
        self.errors: list[Exception] = []

    def on_events(self, events: list[Event]) -> None:
        with self.lock:
            self.events.extend(events)

    def on_error(self, exc: Exception) -> None:
        with self.lock:
            self.errors.append(exc)

    def snapshot(self) -> list[tuple[str, str, bytes]]:
        with self.lock:
            return [(e.kind, e.key, e.value) for e in self.events]

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Event]:
        wait_until(lambda: len(self.events) >= n, timeout, f"{n} watch events (have {self.snapshot()})")
        with self.lock:
            return list(self.events)


def watch(store: Any, key: str, start_revision: int, prefix: bool = False) -> tuple[Recorder, Any]:
    rec = Recorder()
    return rec, store.watch(key, rec.on_events, rec.on_error, start_revision, prefix=prefix)


# --- get / put / revisions ----------------------------------------------------------------------
def test_get_absent_returns_none_and_the_store_revision(store: Any, p: str) -> None:
    kv, rev = store.get(p + "missing")
    assert kv is None
    assert rev >= 1


def test_put_returns_revisions_and_get_reports_them(store: Any, p: str) -> None:
    _, start = store.get(p + "x")
    r1 = store.put(p + "a", b"one")
    assert r1 > start
    kv, rev = store.get(p + "a")
    assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.lease) == (p + "a", b"one", r1, r1, 0)
    assert rev >= r1
    r2 = store.put(p + "a", b"two")
    assert r2 > r1
    kv, _ = store.get(p + "a")
    assert (kv.value, kv.create_revision, kv.mod_revision) == (b"two", r1, r2)


def test_get_prefix_is_ordered_by_key_and_stays_inside_the_prefix(store: Any, p: str) -> None:
    store.put(p + "n/c", b"3")
    store.put(p + "n/a", b"1")
    last = store.put(p + "n/b", b"2")
    store.put(p + "n2/x", b"outside")
    store.put(p + "n", b"outside too")
    kvs, rev = store.get_prefix(p + "n/")
    assert [(kv.key, kv.value) for kv in kvs] == [(p + "n/a", b"1"), (p + "n/b", b"2"), (p + "n/c", b"3")]
    assert rev > last
    assert store.get_prefix(p + "none/") == ([], store.get(p)[1])


def test_binary_values_survive(store: Any, p: str) -> None:
    value = bytes(range(256))
    store.put(p + "bin", value)
    assert store.get(p + "bin")[0].value == value


# --- replace (compare-and-swap) -----------------------------------------------------------------
def test_replace_zero_means_absent(store: Any, p: str) -> None:
    r1 = store.replace(p + "k", b"first", 0)
    assert r1 is not None
    assert store.replace(p + "k", b"second", 0) is None  # exists now
    assert store.get(p + "k")[0].value == b"first"


def test_replace_succeeds_only_on_the_matching_mod_revision(store: Any, p: str) -> None:
    r1 = store.put(p + "k", b"v1")
    r2 = store.put(p + "k", b"v2")
    assert store.replace(p + "k", b"stale", r1) is None
    assert store.replace(p + "k", b"future", r2 + 100) is None
    assert store.get(p + "k")[0].value == b"v2"
    r3 = store.replace(p + "k", b"v3", r2)
    assert r3 is not None and r3 > r2
    kv, _ = store.get(p + "k")
    assert (kv.value, kv.mod_revision) == (b"v3", r3)
    assert store.replace(p + "k", b"again", r2) is None  # the revision moved on


def test_replace_of_an_absent_key_with_a_revision_fails(store: Any, p: str) -> None:
    assert store.replace(p + "nothing", b"v", 5) is None
    assert store.get(p + "nothing")[0] is None


def test_replace_after_delete_needs_zero(store: Any, p: str) -> None:
    r = store.put(p + "k", b"v")
    store.delete(p + "k")
    assert store.replace(p + "k", b"v2", r) is None
    assert store.replace(p + "k", b"v2", 0) is not None


# --- commit ---------------------------------------------------------------------------------------
def test_commit_with_several_compares_writes_all_and_reads_after(store: Any, p: str) -> None:
    ra = store.put(p + "a", b"a1")
    rb = store.put(p + "b", b"b1")
    result = store.commit([(p + "a", ra), (p + "b", rb), (p + "c", 0)],
                          [(p + "a", b"a2"), (p + "c", b"c1")], reads=(p + "a", p + "b", p + "c", p + "zz"))
    assert result.succeeded
    assert result.revision > rb
    a, b, c, zz = result.reads
    assert (a.value, b.value, c.value, zz) == (b"a2", b"b1", b"c1", None)
    assert c.mod_revision == result.revision
    assert store.get(p + "c")[0].value == b"c1"


def test_one_request_is_one_revision(store: Any, backend: str, p: str, request: pytest.FixtureRequest) -> None:
    """etcd gives a transaction, a prefix delete and a revoke a single revision."""
    result = store.commit([], [(p + "a", b"1"), (p + "b", b"2")], reads=(p + "a", p + "b"))
    assert result.reads[0].mod_revision == result.reads[1].mod_revision == result.revision
    _, before = store.get(p)
    store.delete_prefix(p)
    _, after = store.get(p)
    assert after == before + 1
    lease = store.grant(30)
    store.put(p + "x", b"1", lease=lease)
    store.put(p + "y", b"1", lease=lease)
    _, before = store.get(p)
    store.revoke(lease)
    _, after = store.get(p)
    assert after == before + 1


def test_commit_fails_whole_when_one_compare_fails(store: Any, p: str) -> None:
    ra = store.put(p + "a", b"a1")
    rb = store.put(p + "b", b"b1")
    store.put(p + "b", b"b2")  # b moved on
    result = store.commit([(p + "a", ra), (p + "b", rb)], [(p + "a", b"a2"), (p + "new", b"x")],
                          reads=(p + "a", p + "b"))
    assert not result.succeeded
    a, b = result.reads
    assert (a.value, b.value) == (b"a1", b"b2")  # reads happen on failure too
    assert store.get(p + "new")[0] is None
    assert result.revision == store.get(p + "a")[1]


def test_commit_zero_compare_fails_when_the_key_exists(store: Any, p: str) -> None:
    store.put(p + "a", b"x")
    assert not store.commit([(p + "a", 0)], [(p + "a", b"y")]).succeeded
    assert store.get(p + "a")[0].value == b"x"


def test_commit_without_compares_or_puts_is_a_consistent_read(store: Any, p: str) -> None:
    store.put(p + "a", b"x")
    result = store.commit([], [], reads=(p + "a", p + "b"))
    assert result.succeeded
    assert result.reads[0].value == b"x" and result.reads[1] is None


def test_commit_attaches_puts_to_the_lease(store: Any, p: str) -> None:
    lease = store.grant(10)
    try:
        result = store.commit([(p + "a", 0)], [(p + "a", b"x"), (p + "b", b"y")], lease=lease, reads=(p + "a",))
        assert result.succeeded and result.reads[0].lease == lease
        assert store.get(p + "b")[0].lease == lease
    finally:
        store.revoke(lease)
    assert store.get(p + "a")[0] is None and store.get(p + "b")[0] is None


def test_concurrent_commits_on_one_revision_admit_exactly_one(store: Any, p: str) -> None:
    rev = store.put(p + "round", b"open")
    results: list[bool] = []
    barrier = threading.Barrier(4)

    def attempt(i: int) -> None:
        barrier.wait(timeout=10)
        results.append(store.commit([(p + "round", rev)], [(p + "round", f"closed by {i}".encode())]).succeeded)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    assert sorted(results) == [False, False, False, True]


# --- get_or_create / predecessor / count / delete -------------------------------------------------
def test_get_or_create(store: Any, p: str) -> None:
    kv = store.get_or_create(p + "status", b"first")
    assert kv.value == b"first" and kv.create_revision == kv.mod_revision
    again = store.get_or_create(p + "status", b"second")
    assert again == kv  # unchanged: same value, same revisions


def test_predecessor_orders_by_create_revision(store: Any, p: str) -> None:
    q = p + "joined/"
    ra = store.put(q + "zeta", b"1")
    rb = store.put(q + "alpha", b"2")
    rc = store.put(q + "mid", b"3")
    store.put(p + "joinedX", b"outside")  # shares the text prefix but not the folder
    store.put(q + "zeta", b"1 again")  # a later modification keeps its create revision
    assert store.predecessor(q, ra) is None
    assert store.predecessor(q, rb).key == q + "zeta"
    assert store.predecessor(q, rc).key == q + "alpha"
    last = store.predecessor(q, rc + 1000)
    assert last.key == q + "mid" and last.create_revision == rc
    store.delete(q + "alpha")
    assert store.predecessor(q, rc).key == q + "zeta"


def test_count_prefix(store: Any, p: str) -> None:
    assert store.count_prefix(p + "done/") == 0
    for i in range(5):
        store.put(f"{p}done/n{i}", b"1")
    store.put(p + "done", b"not under the folder")
    store.put(p + "done2/x", b"not under the folder")
    assert store.count_prefix(p + "done/") == 5


def test_delete_and_delete_prefix(store: Any, p: str) -> None:
    for key in ("r/1/a", "r/1/b", "r/10/a", "r/2/a"):
        store.put(p + key, b"x")
    store.delete(p + "r/2/a")
    store.delete(p + "never-existed")
    assert store.get(p + "r/2/a")[0] is None
    store.delete_prefix(p + "r/1/")
    assert [kv.key for kv in store.get_prefix(p)[0]] == [p + "r/10/a"]
    store.delete_prefix(p + "nothing/")


# --- leases -------------------------------------------------------------------------------------
def test_revoke_removes_the_lease_keys_at_once(store: Any, p: str) -> None:
    lease = store.grant(30)
    other = store.grant(30)
    try:
        store.put(p + "a", b"x", lease=lease)
        store.put(p + "b", b"y", lease=lease)
        store.put(p + "c", b"z", lease=other)
        store.put(p + "d", b"w")
        assert store.get(p + "a")[0].lease == lease
        store.revoke(lease)
        assert store.get(p + "a")[0] is None and store.get(p + "b")[0] is None
        assert store.get(p + "c")[0] is not None and store.get(p + "d")[0] is not None
    finally:
        store.revoke(other)
    assert store.get(p + "c")[0] is None


def test_a_revoked_lease_is_lost(store: Any, p: str) -> None:
    lease = store.grant(30)
    store.revoke(lease)
    store.revoke(lease)  # revoking twice is fine: the lease is gone either way
    with pytest.raises(LeaseLostError):
        store.keepalive(lease)
    with pytest.raises(LeaseLostError):
        store.put(p + "a", b"x", lease=lease)
    with pytest.raises(LeaseLostError):
        store.replace(p + "a", b"x", 0, lease=lease)
    with pytest.raises(LeaseLostError):
        store.commit([], [(p + "a", b"x")], lease=lease)
    assert store.get(p + "a")[0] is None


def test_rewriting_a_key_without_lease_detaches_it(store: Any, p: str) -> None:
    lease = store.grant(30)
    store.put(p + "a", b"leased", lease=lease)
    store.put(p + "a", b"free")
    store.revoke(lease)
    kv = store.get(p + "a")[0]
    assert kv is not None and kv.value == b"free" and kv.lease == 0


def test_keys_vanish_after_ttl_without_keepalive(store: Any, p: str) -> None:
    t0 = time.monotonic()
    lease = store.grant(2)
    store.put(p + "a", b"x", lease=lease)
    assert store.get(p + "a")[0] is not None
    wait_until(lambda: store.get(p + "a")[0] is None, 8, "the leased key to expire")
    assert time.monotonic() - t0 >= 1.9  # not before its TTL
    with pytest.raises(LeaseLostError):
        store.keepalive(lease)


def test_keepalive_extends_the_lease(store: Any, p: str) -> None:
    lease = store.grant(2)
    store.put(p + "a", b"x", lease=lease)
    assert store.keepalive(lease) >= 2
    end = time.monotonic() + 3.0  # well past the first TTL
    while time.monotonic() < end:
        store.keepalive(lease)
        assert store.get(p + "a")[0] is not None
        time.sleep(0.4)  # the refresh cadence under test, not a synchronisation
    wait_until(lambda: store.get(p + "a")[0] is None, 8, "the key to expire once refreshes stop")


def test_a_lease_lives_at_least_the_ttl_asked_for(store: Any, backend: str, request: pytest.FixtureRequest) -> None:
    lease = store.grant(2.4)
    try:
        assert store.keepalive(lease) >= 2.4
    finally:
        store.revoke(lease)


# --- watches ------------------------------------------------------------------------------------
def test_watch_replays_past_events_then_follows_in_order(store: Any, p: str) -> None:
    _, start = store.get(p)
    store.put(p + "w/a", b"1")
    store.put(p + "w/b", b"2")
    store.delete(p + "w/a")
    store.put(p + "other", b"not watched")
    rec, w = watch(store, p + "w/", start + 1, prefix=True)
    try:
        store.put(p + "w/c", b"3")
        store.put(p + "w/b", b"4")
        store.delete_prefix(p + "w/")
        events = rec.wait_for(7)
        assert [(e.kind, e.key, e.value) for e in events] == [
            (PUT, p + "w/a", b"1"), (PUT, p + "w/b", b"2"), (DELETE, p + "w/a", b""),
            (PUT, p + "w/c", b"3"), (PUT, p + "w/b", b"4"),
            (DELETE, p + "w/b", b""), (DELETE, p + "w/c", b""),
        ]
        revs = [e.mod_revision for e in events]
        assert revs == sorted(revs) and revs[0] > start
        assert events[4].create_revision == events[1].create_revision  # b's second write keeps its creation
        assert not rec.errors
    finally:
        w.cancel()


def test_watch_from_a_revision_skips_older_events(store: Any, p: str) -> None:
    store.put(p + "k", b"old")
    r2 = store.put(p + "k", b"new")
    rec, w = watch(store, p + "k", r2)
    try:
        store.put(p + "k", b"newer")
        events = rec.wait_for(2)
        assert [e.value for e in events] == [b"new", b"newer"]
    finally:
        w.cancel()


def test_key_watch_ignores_longer_keys(store: Any, p: str) -> None:
    _, rev = store.get(p)
    rec, w = watch(store, p + "k", rev + 1)
    sentinel, ws = watch(store, p + "s", rev + 1)
    try:
        store.put(p + "kk", b"no")
        store.put(p + "k/x", b"no")
        store.put(p + "k", b"yes")
        store.put(p + "s", b"done")
        sentinel.wait_for(1)
        assert rec.wait_for(1) and rec.snapshot() == [(PUT, p + "k", b"yes")]
    finally:
        w.cancel()
        ws.cancel()


def test_watch_reports_lease_deletions(store: Any, p: str) -> None:
    lease = store.grant(30)
    rev = store.put(p + "n/a", b"x", lease=lease)
    rec, w = watch(store, p + "n/", rev + 1, prefix=True)
    try:
        store.revoke(lease)
        assert rec.wait_for(1)[0].kind == DELETE
        assert rec.snapshot() == [(DELETE, p + "n/a", b"")]
    finally:
        w.cancel()


def test_cancel_stops_delivery(store: Any, p: str) -> None:
    _, rev = store.get(p)
    rec, w = watch(store, p + "x", rev + 1)
    sentinel, ws = watch(store, p + "y", rev + 1)
    try:
        store.put(p + "x", b"1")
        rec.wait_for(1)
        w.cancel()
        w.cancel()  # idempotent
        store.put(p + "x", b"2")
        store.put(p + "y", b"after")  # once this arrives, anything for x would have too
        sentinel.wait_for(1)
        assert rec.snapshot() == [(PUT, p + "x", b"1")]
        assert not rec.errors
    finally:
        ws.cancel()


def test_many_watches_on_one_store(store: Any, p: str) -> None:
    _, rev = store.get(p)
    pairs = [watch(store, f"{p}m/{i}", rev + 1) for i in range(20)]
    try:
        for i in range(20):
            store.put(f"{p}m/{i}", str(i).encode())
        for i, (rec, _) in enumerate(pairs):
            assert [e.value for e in rec.wait_for(1)] == [str(i).encode()]
    finally:
        for _, w in pairs:
            w.cancel()


def test_broken_watch_reports_on_error(backend: str, p: str, request: pytest.FixtureRequest) -> None:
    """A lost connection ends every watch with one on_error; a new watch works once the store is back."""
    if backend == "memory":
        store: Any = MemoryStore()
        break_it: Callable[[], None] = store.fail_watches
        heal: Callable[[], None] = lambda: None
    else:
        server = request.getfixturevalue("etcd_factory")()
        store = EtcdStore(server.endpoint, retry_for=3.0)
        break_it, heal = server.kill, server.start
    try:
        _, rev = store.get(p)
        recs = [watch(store, p + "k", rev + 1), watch(store, p + "j/", rev + 1, prefix=True)]
        before = store.put(p + "k", b"1")
        recs[0][0].wait_for(1)
        break_it()
        for rec, _ in recs:
            wait_until(lambda: rec.errors, 15, "on_error after the watch broke")
            assert len(rec.errors) == 1
            assert isinstance(rec.errors[0], StoreUnavailableError)
        heal()
        store.put(p + "k", b"2")
        rec, w = watch(store, p + "k", before + 1)
        assert [e.value for e in rec.wait_for(1)] == [b"2"]
        w.cancel()
        for old, _ in recs:  # the broken watches stay dead
            assert old.snapshot() in ([], [(PUT, p + "k", b"1")])
            assert len(old.errors) == 1
    finally:
        store.close()


def test_unavailable_store_raises_a_typed_error_promptly(backend: str, p: str,
                                                         request: pytest.FixtureRequest) -> None:
    if backend == "memory":
        store: Any = MemoryStore()
        store.available = False
    else:
        server = request.getfixturevalue("etcd_factory")()
        store = EtcdStore(server.endpoint, retry_for=1.0, request_timeout=0.5)
        store.get(p)
        server.kill()
    try:
        for op in (lambda: store.get(p + "a"), lambda: store.put(p + "a", b"x"),
                   lambda: store.commit([(p + "a", 0)], [(p + "a", b"x")]), lambda: store.grant(5)):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                op()
            assert time.monotonic() - t0 < 6
    finally:
        store.close()


def test_a_request_racing_a_fail_over_is_retried_not_raised(etcd: EtcdServer, p: str) -> None:
    """Another thread (the keep-alive, a watch) may fail over and close the channel while a
    request is in flight; gRPC then raises ``ValueError: Channel closed!``. That request is
    retried on the new channel; it must not escape as a traceback."""
    store = EtcdStore(etcd.endpoint, retry_for=5.0)
    try:
        store.put(f"{p}/k", b"v")
        real = store._channel.stubs
        raced = threading.Event()

        def stubs_then_close() -> Any:
            stubs = real()
            if not raced.is_set():
                raced.set()
                store._channel.fail_over()  # what the keep-alive thread does on a lost stream
            return stubs

        store._channel.stubs = stubs_then_close  # type: ignore[method-assign]
        kv, _ = store.get(f"{p}/k")
        assert raced.is_set() and kv is not None and kv.value == b"v"
    finally:
        store.close()
