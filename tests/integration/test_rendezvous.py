"""Several participants against a real etcd, each with its own EtcdStore (its own gRPC channel,
watch stream and lease), blocking calls in their own threads. Short timings throughout;
every wait is bounded, and a call that does not return in time fails the test as a hang."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from rendezvous.errors import (
    CorruptStateError,
    JobFinishedError,
    LeaseLostError,
    RendezvousError,
    RendezvousTimeoutError,
)
from rendezvous.etcd.server import EtcdServer
from rendezvous.etcd.store import EtcdStore
from rendezvous.participant import Notice, Participant
from rendezvous.protocol import round_members
from rendezvous.settings import Settings
from rendezvous.state import Assignment, JobStatus, NodeRecord, Outcome, RestartCount, RoundPhase, RoundState
from rendezvous.store import PUT, Event
from tests.conftest import wait_until

HANG_S = 30.0  # any single blocking call taking longer than this is a hang


def short(job_id: str, min_nodes: int, max_nodes: int, **kw: Any) -> Settings:
    kw.setdefault("lease_ttl", 3)
    kw.setdefault("last_call", 0.3)
    kw.setdefault("scale_up_cooldown", 0.3)
    return Settings(job_id=job_id, min_nodes=min_nodes, max_nodes=max_nodes, **kw)


class Task:
    """A blocking call on its own (daemon) thread; ``get`` fails the test if it hangs."""

    def __init__(self, fn: Callable[[], Any], name: str = "task") -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished_at = 0.0
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(fn,), daemon=True, name=name).start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self.done.set()

    def outcome(self, timeout: float = HANG_S) -> Any:
        """The result, or the exception raised."""
        if not self.done.wait(timeout):
            raise AssertionError(f"call did not return within {timeout}s (hang)")
        return self.error if self.error is not None else self.result

    def get(self, timeout: float = HANG_S) -> Any:
        out = self.outcome(timeout)
        if self.error is not None:
            raise self.error
        return out


class Job:
    """Participants of one job; each has its own store. Everything is closed at teardown."""

    def __init__(self, endpoint: str, settings: Settings) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self.stores: list[EtcdStore] = []
        self.participants: dict[str, Participant] = {}
        self.admin = self.store()

    def store(self, **kw: Any) -> EtcdStore:
        kw.setdefault("retry_for", 2.0)
        s = EtcdStore(self.endpoint, **kw)
        self.stores.append(s)
        return s

    def participant(self, node_id: str, start: bool = True, store: Any = None) -> Participant:
        p = Participant(store or self.store(), self.settings, NodeRecord(node_id, f"{node_id}.test", 2))
        self.participants[node_id] = p
        if start:
            p.start(timeout=10)
        return p

    def start(self, *ids: str) -> list[Participant]:
        return [self.participant(i) for i in ids]

    def assign(self, *ps: Participant, timeout: float = 20.0) -> list[Assignment]:
        """next_assignment on every participant at once (a round only closes when they all act)."""
        tasks = [Task(lambda p=p: p.next_assignment(timeout=timeout), p.node_id) for p in ps]
        return [t.get(timeout + 10) for t in tasks]

    def poll_all(self, *ps: Participant, timeout: float = 15.0) -> list[Notice | None]:
        tasks = [Task(lambda p=p: p.poll(timeout), p.node_id) for p in ps]
        return [t.get(timeout + 10) for t in tasks]

    def round(self) -> RoundState:
        kv, _ = self.admin.get(self.settings.round_key)
        assert kv is not None
        return round_members.load(self.admin, self.settings, kv)[0]

    def round_history(self) -> list[RoundState]:
        """Every value ever written to the round key (etcd keeps the history; nothing is compacted),
        each closed one with the members written in the same transaction (or, amended in place,
        the assignment before)."""
        kv, _ = self.admin.get(self.settings.round_key)
        assert kv is not None
        events: list[Event] = []
        w = self.admin.watch(self.settings.root, events.extend, lambda e: None, 1, prefix=True)
        try:
            wait_until(lambda: events and events[-1].mod_revision >= kv.mod_revision, 10, "round history")
        finally:
            w.cancel()
        members = {e.mod_revision: e for e in events if e.kind == PUT and e.key.endswith("/members")}
        history: list[RoundState] = []
        for e in events:
            if e.kind != PUT or e.key != self.settings.round_key:
                continue
            rnd = RoundState.decode(e.key, e.value)
            if not rnd.is_open and e.mod_revision in members:
                rnd = rnd.with_members(members[e.mod_revision].key, members[e.mod_revision].value)
            elif not rnd.is_open and history and history[-1].number == rnd.number:
                rnd = replace(rnd, assignment=history[-1].assignment)
            history.append(rnd)
        return history

    def close(self) -> None:
        for p in self.participants.values():
            try:
                p.close()
            except RendezvousError:
                pass
        for s in self.stores:
            s.close()


@pytest.fixture
def make_job(etcd: EtcdServer, job_id: str) -> Iterator[Callable[..., Job]]:
    jobs: list[Job] = []

    def make(min_nodes: int, max_nodes: int, endpoint: str | None = None, **kw: Any) -> Job:
        job = Job(endpoint or etcd.endpoint, short(f"{job_id}-{len(jobs)}", min_nodes, max_nodes, **kw))
        jobs.append(job)
        return job

    yield make
    for job in jobs:
        job.close()


def assert_one_assignment_per_round(job: Job) -> list[RoundState]:
    history = job.round_history()
    # A closed round may be amended in place (a grow request, a stop step); its assignment never changes.
    assignments = {(r.number, r.assignment) for r in history if r.state == RoundPhase.CLOSED}
    closed = [number for number, _ in assignments]
    assert len(closed) == len(set(closed)), f"a round closed twice: {history}"
    for r in history:
        if r.state == RoundPhase.CLOSED:
            ids = r.assignment.node_ids  # type: ignore[union-attr]
            assert len(set(ids)) == len(ids)
            assert job.settings.min_nodes <= len(ids) <= job.settings.max_nodes
    return history


# --- closing a round -----------------------------------------------------------------------------------
def test_min_reached_closes_after_the_last_call(make_job: Callable[..., Job]) -> None:
    job = make_job(2, 4, last_call=0.8)
    a, b = job.start("a", "b")
    t0 = time.monotonic()
    got = job.assign(a, b)
    elapsed = time.monotonic() - t0
    assert got[0] == got[1]
    assert sorted(got[0].node_ids) == ["a", "b"] and got[0].round == 1
    assert elapsed >= 0.75, "the first round must wait for the last call"
    assert got[0].world_size == 4
    assert_one_assignment_per_round(job)


def test_max_closes_at_once(make_job: Callable[..., Job]) -> None:
    job = make_job(1, 3, last_call=60.0)
    ps = job.start("a", "b", "c")
    t0 = time.monotonic()
    got = job.assign(*ps)
    assert time.monotonic() - t0 < 10, "max nodes must not wait for the 60 s last call"
    assert got[0] == got[1] == got[2] and sorted(got[0].node_ids) == ["a", "b", "c"]


class Abort(Exception):
    pass


def test_coordinator_leaving_mid_round_hands_over(make_job: Callable[..., Job]) -> None:
    job = make_job(2, 3, last_call=2.0)
    a, b = job.start("a", "b")
    leaving = threading.Event()

    def on_tick() -> None:  # as an agent's loop does: a signal sets a flag, the loop acts on it
        if leaving.is_set():
            raise Abort

    ta = Task(lambda: a.next_assignment(timeout=20, on_tick=on_tick))
    wait_until(lambda: job.admin.count_prefix(job.settings.joined_prefix(1)) == 1, 10, "a joined")
    tb = Task(lambda: b.next_assignment(timeout=20))
    wait_until(lambda: job.admin.count_prefix(job.settings.joined_prefix(1)) == 2, 10, "b joined")
    leaving.set()
    assert isinstance(ta.outcome(), Abort)
    assert job.round().is_open
    a.leave()  # the coordinator (first joiner) goes away before the round closes
    c = job.participant("c")
    got_c = Task(lambda: c.next_assignment(timeout=20)).get()
    assert tb.get() == got_c and got_c.node_ids == ("b", "c") and got_c.round == 1
    assert_one_assignment_per_round(job)


# --- standbys and scale-up ----------------------------------------------------------------------------
def test_beyond_max_waits_as_standby_until_a_member_leaves(make_job: Callable[..., Job]) -> None:
    job = make_job(1, 2)
    a, b = job.start("a", "b")
    first = job.assign(a, b)[0]
    s = job.participant("s")
    ts = Task(lambda: s.next_assignment(timeout=25))
    wait_until(lambda: job.admin.get(job.settings.joined_key(2, "s"))[0], 10, "the standby to pre-join round 2")
    assert job.round().number == 1 and not ts.done.is_set()  # waiting, not admitted: the round is full
    assert job.poll_all(a, b, timeout=0.3) == [None, None]  # nothing disturbs the members
    leaver, stayer = (a, b) if first.node_ids[0] == "a" else (b, a)
    leaver.leave("preempted")
    notice = stayer.poll(10)
    assert notice is not None and notice.kind == "round"
    got = job.assign(stayer)[0]
    assert ts.get() == got
    assert got.node_ids == (stayer.node_id, "s") and got.round == 2


def test_standby_is_admitted_when_a_member_lease_expires(make_job: Callable[..., Job]) -> None:
    job = make_job(1, 2, lease_ttl=2)
    a, b = job.start("a", "b")
    order = job.assign(a, b)[0].node_ids
    s = job.participant("s")
    ts = Task(lambda: s.next_assignment(timeout=20))
    wait_until(lambda: job.admin.get(job.settings.joined_key(2, "s"))[0], 10, "the standby to pre-join round 2")
    victim, survivor = job.participants[order[0]], job.participants[order[1]]
    victim.close()
    notice = survivor.poll(12)
    assert notice is not None and notice.detail == f"node_lost: {victim.node_id}"
    got = job.assign(survivor)[0]
    assert ts.get() == got and got.node_ids == (survivor.node_id, "s")


def test_standby_is_admitted_when_the_only_member_lease_expires(make_job: Callable[..., Job]) -> None:
    job = make_job(1, 1, lease_ttl=2)
    a = job.start("a")[0]
    job.assign(a)
    s = job.participant("s")
    ts = Task(lambda: s.next_assignment(timeout=5))
    wait_until(lambda: job.admin.get(job.settings.joined_key(2, "s"))[0], 10, "the standby to pre-join round 2")
    a.close()
    assert ts.get(20).node_ids == ("s",)


def test_standby_scales_up_after_the_cooldown(make_job: Callable[..., Job]) -> None:
    job = make_job(1, 3, scale_up_cooldown=1.0)
    a = job.start("a")[0]
    job.assign(a)
    b = job.participant("b")
    t0 = time.monotonic()
    tb = Task(lambda: b.next_assignment(timeout=20))
    notice = a.poll(10)
    opened = time.monotonic() - t0
    assert notice is not None and notice.kind == "round"
    assert notice.detail == "scale_up: b is waiting"
    assert opened >= 0.95, f"the round opened {opened:.2f}s after b joined, before the 1 s cool-down"
    got = job.assign(a)[0]
    assert tb.get() == got and got.node_ids == ("a", "b")


# --- losing members ------------------------------------------------------------------------------------
def test_expired_member_lease_opens_a_round_without_it(make_job: Callable[..., Job]) -> None:
    job = make_job(1, 3, lease_ttl=2)
    ps = job.start("a", "b", "c")
    order = job.assign(*ps)[0].node_ids
    victim = job.participants[order[1]]
    survivors = [job.participants[n] for n in order if n != victim.node_id]
    t0 = time.monotonic()
    victim.close()  # stops refreshing without revoking: etcd expires the lease
    notices = job.poll_all(*survivors, timeout=12)
    assert time.monotonic() - t0 < 10
    for n in notices:
        assert n is not None and n.kind == "round" and n.round is not None and n.round.number == 2
    assert job.round().reason == f"node_lost: {victim.node_id}"
    got = job.assign(*survivors)
    assert got[0] == got[1] and got[0].node_ids == tuple(n for n in order if n != victim.node_id)


@pytest.mark.parametrize("reason", ["preempted", None])
def test_leave_is_noticed_at_once(make_job: Callable[..., Job], reason: str | None) -> None:
    job = make_job(1, 3, lease_ttl=20)  # far longer than the test may take
    ps = job.start("a", "b", "c")
    order = job.assign(*ps)[0].node_ids
    leaver = job.participants[order[0]]
    others = [job.participants[n] for n in order[1:]]
    t0 = time.monotonic()
    leaver.leave(reason)
    notices = job.poll_all(*others, timeout=10)
    assert time.monotonic() - t0 < 5, "a leave must not wait for the lease TTL"
    assert all(n is not None and n.kind == "round" for n in notices)
    expected = f"node_left: {leaver.node_id} (preempted)" if reason else f"node_lost: {leaver.node_id}"
    assert job.round().reason == expected
    assert job.admin.get(job.settings.node_key(leaver.node_id))[0] is None
    got = job.assign(*others)
    assert got[0].node_ids == order[1:]


def test_survivors_keep_their_relative_rank_order(make_job: Callable[..., Job]) -> None:
    job = make_job(1, 5, scale_up_cooldown=0.2)
    ps = job.start("n1", "n2", "n3", "n4")
    first = job.assign(*ps)[0].node_ids
    leaver = job.participants[first[1]]
    leaver.leave("preempted")
    rest = [job.participants[n] for n in first if n != leaver.node_id]
    job.poll_all(*rest)
    second = job.assign(*rest)[0].node_ids
    assert second == tuple(n for n in first if n != leaver.node_id)
    newcomer = job.participant("n5")
    tn = Task(lambda: newcomer.next_assignment(timeout=20))
    assert all(n is not None and n.kind == "round" for n in job.poll_all(*rest))
    third = job.assign(*rest)[0].node_ids
    assert tn.get().node_ids == third == second + ("n5",)
    history = assert_one_assignment_per_round(job)
    assert [r.reason.split(":")[0] for r in history if r.state == RoundPhase.OPEN] == ["start", "node_left", "scale_up"]


# --- exactly one assignment ------------------------------------------------------------------------------
def test_racing_commits_on_the_round_revision_admit_exactly_one(etcd: EtcdServer, job_id: str) -> None:
    stores = [EtcdStore(etcd.endpoint) for _ in range(2)]
    try:
        for i in range(50):
            key = f"/race/{job_id}/{i}/round"
            rev = stores[0].put(key, b"open")
            barrier = threading.Barrier(2)

            def close(s: EtcdStore, who: str) -> bool:
                barrier.wait(timeout=10)
                return s.commit([(key, rev)], [(key, who.encode())]).succeeded

            tasks = [Task(lambda s=s, w=w: close(s, w)) for s, w in zip(stores, ("x", "y"))]
            wins = [t.get(10) for t in tasks]
            assert sorted(wins) == [False, True], f"attempt {i}: {wins}"
            winner = "xy"[wins.index(True)]
            assert stores[1].get(key)[0].value == winner.encode()
    finally:
        for s in stores:
            s.close()


class EveryoneCoordinates:
    """A store through which every joiner sees no predecessor, so every one of them tries to
    close the round: only the compare-and-swap stands between them and two assignments."""

    def __init__(self, inner: EtcdStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predecessor(self, prefix: str, create_revision: int) -> None:
        return None


def test_rival_coordinators_produce_exactly_one_assignment(etcd: EtcdServer, make_job: Callable[..., Job]) -> None:
    for i in range(50):
        job = make_job(3, 3, last_call=5.0)
        ps = [job.participant(f"n{k}", store=EveryoneCoordinates(job.store())) for k in range(3)]
        got = job.assign(*ps, timeout=15)
        assert got[0] == got[1] == got[2], f"attempt {i}: {got}"
        history = assert_one_assignment_per_round(job)
        assert [r.state for r in history] == [RoundPhase.OPEN, RoundPhase.CLOSED], f"attempt {i}: {history}"
        job.close()


# --- etcd trouble ---------------------------------------------------------------------------------------------
def test_etcd_restart_mid_round_recovers(etcd_factory: Callable[[], EtcdServer],
                                         make_job: Callable[..., Job]) -> None:
    server = etcd_factory()
    job = make_job(3, 3, endpoint=server.endpoint, lease_ttl=5, last_call=0.3)
    a, b = job.start("a", "b")
    tasks = [Task(lambda p=p: p.next_assignment(timeout=25)) for p in (a, b)]
    wait_until(lambda: job.admin.count_prefix(job.settings.joined_prefix(1)) == 2, 10, "a and b joined")
    server.kill()
    server.start()
    c = job.participant("c")
    tasks.append(Task(lambda: c.next_assignment(timeout=25)))
    outcomes = [t.outcome(40) for t in tasks]
    for out in outcomes:
        assert isinstance(out, (Assignment, RendezvousError)), f"untyped failure: {out!r}"
    assert all(isinstance(o, Assignment) for o in outcomes), f"a short restart should be survived: {outcomes}"
    assert outcomes[0] == outcomes[1] == outcomes[2]


def test_etcd_blip_while_running_restarts_nothing(etcd_factory: Callable[[], EtcdServer],
                                                  make_job: Callable[..., Job]) -> None:
    server = etcd_factory()
    job = make_job(1, 2, endpoint=server.endpoint, lease_ttl=3)
    a, b = job.start("a", "b")
    job.assign(a, b)
    server.kill()
    server.start()
    assert job.poll_all(a, b, timeout=2.0) == [None, None], "a short etcd restart must not open a round"
    assert job.round().number == 1
    # the watches were re-established: losing a member is still noticed
    b.close()
    notice = a.poll(12)
    assert notice is not None and notice.kind == "round" and notice.detail == "node_lost: b"


def test_etcd_down_longer_than_the_ttl_is_a_typed_error_not_a_hang(etcd_factory: Callable[[], EtcdServer],
                                                                   make_job: Callable[..., Job]) -> None:
    server = etcd_factory()
    job = make_job(2, 3, endpoint=server.endpoint, lease_ttl=2)
    a, b = job.start("a", "b")
    job.assign(a, b)
    c = job.participant("c")
    tc = Task(lambda: c.next_assignment(timeout=60))  # a standby, waiting
    wait_until(lambda: job.admin.get(job.settings.joined_key(2, "c"))[0], 10, "c to pre-join round 2")
    t0 = time.monotonic()
    server.kill()
    notices = job.poll_all(a, b, timeout=25)
    for n in notices:
        assert n is not None and n.kind == "lease_lost", n
    out = tc.outcome(25)
    assert isinstance(out, LeaseLostError), f"expected LeaseLostError, got {out!r}"
    assert time.monotonic() - t0 < 15, "losing etcd must be reported within the lease TTL plus retries"


# --- restart budget and outcome -------------------------------------------------------------------------------
def test_worker_failures_charge_the_budget_until_the_job_fails(make_job: Callable[..., Job]) -> None:
    job = make_job(2, 2, max_restarts=1)
    a, b = job.start("a", "b")
    job.assign(a, b)
    a.request_new_round("worker_failure: rank 1 exited 1")
    assert [n.kind for n in job.poll_all(a, b)] == ["round", "round"]  # type: ignore[union-attr]
    second = job.assign(a, b)
    assert second[0] == second[1] and second[0].round == 2
    kv, _ = job.admin.get(job.settings.restarts_key)
    assert RestartCount.decode(kv.key, kv.value) == RestartCount(1, "worker_failure: rank 1 exited 1")

    b.request_new_round("worker_failure: rank 3 exited 7")
    job.poll_all(a, b)
    tasks = [Task(lambda p=p: p.next_assignment(timeout=15)) for p in (a, b)]
    outcomes = [t.outcome(30) for t in tasks]
    for out in outcomes:
        assert isinstance(out, JobFinishedError) and out.outcome == Outcome.FAILED, out
        assert "restart budget spent (1 of 1 used)" in out.reason
        assert "worker_failure: rank 3 exited 7" in out.reason
    kv, _ = job.admin.get(job.settings.status_key)
    assert JobStatus.decode(kv.key, kv.value).outcome == Outcome.FAILED
    with pytest.raises(JobFinishedError):
        job.participant("late")


def test_node_loss_does_not_charge_the_budget(make_job: Callable[..., Job]) -> None:
    job = make_job(1, 3, max_restarts=0)
    a, b, c = job.start("a", "b", "c")
    first = job.assign(a, b, c)[0]
    a.request_new_round("worker_failure: peer vanished")  # ...because c is leaving at the same time
    c.leave()
    job.poll_all(a, b)
    got = job.assign(a, b)
    assert got[0] == got[1] and got[0].node_ids == tuple(n for n in first.node_ids if n != "c")
    assert job.round().reason == "worker_failure: peer vanished"
    assert job.admin.get(job.settings.restarts_key)[0] is None
    assert job.admin.get(job.settings.status_key)[0] is None


def test_report_done_by_all_members_succeeds_the_job(make_job: Callable[..., Job]) -> None:
    job = make_job(2, 2)
    a, b = job.start("a", "b")
    job.assign(a, b)
    assert a.report_done() is False
    assert job.admin.get(job.settings.status_key)[0] is None
    assert b.report_done() is True
    notices = job.poll_all(a, b, timeout=5)
    assert all(n is not None and n.kind == "finished" and n.status.outcome == Outcome.SUCCEEDED  # type: ignore[union-attr]
               for n in notices)
    with pytest.raises(JobFinishedError) as info:
        job.participant("late")
    assert info.value.outcome == Outcome.SUCCEEDED
    assert job.admin.get(job.settings.node_key("late"))[0] is None


def test_finish_first_writer_wins(make_job: Callable[..., Job]) -> None:
    job = make_job(1, 1)
    a = job.start("a")[0]
    job.assign(a)
    assert a.finish(Outcome.FAILED, "first") == JobStatus(Outcome.FAILED, "first")
    assert a.finish(Outcome.SUCCEEDED, "second") == JobStatus(Outcome.FAILED, "first")


# --- bad etcd contents ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,expected", [
    (b"{oops", "expected a JSON round record, found '{oops'"),
    (b'{"v": 2, "number": 1, "state": "open"}', 'expected "v": 1 (round record), found "v": 2'),
    (b'{"v": 1, "number": 1, "state": "closed"}', "expected the members of closed round 1, found no such key"),
])
def test_corrupt_round_at_start(make_job: Callable[..., Job], raw: bytes, expected: str) -> None:
    job = make_job(1, 2)
    job.admin.put(job.settings.round_key, raw)
    with pytest.raises(CorruptStateError) as info:
        job.participant("a")
    key = job.settings.members_key(1) if "members" in expected else job.settings.round_key
    assert str(info.value) == f"etcd key {key!r}: {expected}"
    wait_until(lambda: job.admin.get(job.settings.node_key("a"))[0] is None, 5, "the failed start to clean up")


@pytest.mark.parametrize("raw,expected", [
    (b"done!", "expected a JSON status record, found 'done!'"),
    (b'{"v": 3, "outcome": "failed", "reason": "x"}', 'expected "v": 1 (status record), found "v": 3'),
    (b'{"v": 1, "outcome": "exploded", "reason": "x"}', "expected field 'outcome' of 'succeeded' or 'failed'"),
])
def test_corrupt_status_at_start(make_job: Callable[..., Job], raw: bytes, expected: str) -> None:
    job = make_job(1, 2)
    job.admin.put(job.settings.status_key, raw)
    with pytest.raises(CorruptStateError) as info:
        job.participant("a")
    assert str(info.value).startswith(f"etcd key {job.settings.status_key!r}: {expected}")


def test_corrupt_join_record_before_the_first_joiner(make_job: Callable[..., Job]) -> None:
    job = make_job(2, 2)
    a = job.start("a")[0]
    bad = job.settings.joined_key(1, "zz-bad")
    job.admin.put(bad, b'{"v": 1, "node_id": "zz-bad", "addr": "h", "nproc": "eight", "master_port": 1}')
    with pytest.raises(CorruptStateError) as info:
        a.next_assignment(timeout=3)
    assert str(info.value) == f"etcd key {bad!r}: expected field 'nproc' of type int, found 'eight'"


def test_corrupt_join_record_seen_by_the_coordinator(make_job: Callable[..., Job]) -> None:
    job = make_job(2, 2)
    a = job.start("a")[0]
    with pytest.raises(RendezvousTimeoutError):
        a.next_assignment(timeout=0.3)  # a joined round 1 and coordinates it
    bad = job.settings.joined_key(1, "zz-bad")
    job.admin.put(bad, b'{"v": 1, "node_id": "zz-bad", "addr": "h", "nproc": "eight", "master_port": 1}')
    with pytest.raises(CorruptStateError) as info:
        a.next_assignment(timeout=10)
    assert str(info.value) == f"etcd key {bad!r}: expected field 'nproc' of type int, found 'eight'"


def test_corrupt_join_record_arriving_later(make_job: Callable[..., Job]) -> None:
    job = make_job(3, 3)
    a = job.start("a")[0]
    ta = Task(lambda: a.next_assignment(timeout=20))
    wait_until(lambda: job.admin.count_prefix(job.settings.joined_prefix(1)) == 1, 10, "a joined")
    bad = job.settings.joined_key(1, "zz-bad")
    job.admin.put(bad, b"\x00\x01")
    out = ta.outcome()
    assert isinstance(out, CorruptStateError)
    assert str(out).startswith(f"etcd key {bad!r}: expected a JSON join record")


def test_corrupt_round_while_running(make_job: Callable[..., Job]) -> None:
    job = make_job(1, 1)
    a = job.start("a")[0]
    job.assign(a)
    job.admin.put(job.settings.round_key, b'{"v": 1, "number": "two", "state": "open"}')
    with pytest.raises(CorruptStateError) as info:
        a.poll(10)
    assert str(info.value) == f"etcd key {job.settings.round_key!r}: expected field 'number' of type int, found 'two'"


def test_corrupt_restart_counter_at_close(make_job: Callable[..., Job]) -> None:
    job = make_job(1, 1)
    job.admin.put(job.settings.restarts_key, b'{"v": 1, "count": -1.5}')
    a = job.start("a")[0]
    with pytest.raises(CorruptStateError) as info:
        a.next_assignment(timeout=10)
    assert str(info.value) == f"etcd key {job.settings.restarts_key!r}: expected field 'count' of type int, found -1.5"


def test_deleted_round_key_is_reported(make_job: Callable[..., Job]) -> None:
    job = make_job(1, 1)
    a = job.start("a")[0]
    job.assign(a)
    job.admin.delete(job.settings.round_key)
    with pytest.raises(CorruptStateError) as info:
        a.poll(10)
    assert str(info.value) == f"etcd key {job.settings.round_key!r}: expected a round record, found the key deleted"


def test_timeout_is_typed(make_job: Callable[..., Job]) -> None:
    job = make_job(2, 2)
    a = job.start("a")[0]
    t0 = time.monotonic()
    with pytest.raises(RendezvousTimeoutError, match="no assignment within 0.5s"):
        a.next_assignment(timeout=0.5)
    assert time.monotonic() - t0 < 3


def test_same_node_id_twice_is_refused(make_job: Callable[..., Job]) -> None:
    job = make_job(1, 2)
    job.start("a")
    twin = Participant(job.store(), job.settings, NodeRecord("a", "other", 1))
    job.participants["a-twin"] = twin
    with pytest.raises(RendezvousError, match="node id 'a' is already registered"):
        twin.start(timeout=0.5)
