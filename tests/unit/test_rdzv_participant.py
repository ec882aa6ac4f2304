"""Participants against a MemoryStore, driven step by step on one thread (no sleeps, no races).

Each node has its own fake monotonic clock that never moves (nothing compares clocks across
nodes); etcd's clock (the store's) is separate and moves only when a test expires leases.
A "step" is one bounded pass of the participant: ``next_assignment(timeout=0)`` while it
waits for an assignment, ``poll(0)`` while it runs.

The property test drives random joins, leaves, lease expiries and worker failures and checks,
over every value ever written to the job's keys, that each round has at most one assignment.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from rendezvous import participant as participant_module
from rendezvous.clock import FakeClock
from rendezvous.errors import CorruptStateError, JobFinishedError, LeaseLostError, RendezvousTimeoutError
from rendezvous.memory_store import MemoryStore
from rendezvous.participant import Notice, Participant
from rendezvous.protocol import round_members
from rendezvous.reasons import reason_kind
from rendezvous.settings import Settings
from rendezvous.state import Assignment, JobStatus, NodeRecord, Outcome, RestartCount, RoundPhase, RoundState
from rendezvous.store import DELETE, PUT, Event

TTL = 30.0  # fake seconds; node clocks never advance, so sessions never refresh or time out on their own


@dataclass
class Node:
    p: Participant
    state: str = "waiting"  # waiting | running | finished | gone
    assignments: list[Assignment] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)


class Cluster:
    """One job on one MemoryStore; every node stepped by the test's thread."""

    def __init__(self, min_nodes: int, max_nodes: int, *, last_call: float = 0.0, cooldown: float = 0.0,
                 max_restarts: int | None = None) -> None:
        self.settings = Settings(job_id="job", min_nodes=min_nodes, max_nodes=max_nodes, lease_ttl=TTL, presence_ttl=TTL,
                                 last_call=last_call, scale_up_cooldown=cooldown, max_restarts=max_restarts)
        self.etcd_clock = FakeClock()
        self.store = MemoryStore(clock=self.etcd_clock, reap_interval=None)
        self.events: list[Event] = []
        # Everything ever written under the job, in order: the record the invariants are checked on.
        self.store.watch(self.settings.root, self.events.extend, self._watch_failed, 1, prefix=True)
        self.nodes: dict[str, Node] = {}
        self._ports = itertools.count(30000)
        self._ids = itertools.count()

    @staticmethod
    def _watch_failed(exc: Exception) -> None:
        raise AssertionError(f"history watch broke: {exc}")

    def add(self, node_id: str | None = None, start: bool = True) -> Node:
        node_id = node_id or f"n{next(self._ids):02d}"
        p = Participant(self.store, self.settings, NodeRecord(node_id, f"{node_id}.local", 2),
                        clock=FakeClock(), port_reserver=lambda: next(self._ports))
        node = self.nodes[node_id] = Node(p)
        if start:
            try:
                p.start()
            except JobFinishedError:
                node.state = "finished"
        return node

    def step(self, node: Node, patient: bool = False) -> None:
        """One bounded pass. ``patient``: let 2 s of the node's own time pass inside the call, so
        its last call and scale-up cool-down can run out (a fresh call restarts them)."""
        if node.state == "waiting":
            clock: FakeClock = node.p.clock  # type: ignore[assignment]
            try:
                if patient:
                    a = node.p.next_assignment(timeout=1.5, on_tick=lambda: clock.advance(1.0))
                else:
                    a = node.p.next_assignment(timeout=0)
            except RendezvousTimeoutError:
                return
            except JobFinishedError:
                node.state = "finished"
                return
            except LeaseLostError:
                node.state = "gone"
                return
            node.assignments.append(a)
            node.state = "running"
        elif node.state == "running":
            notice = node.p.poll(0)
            if notice is None:
                return
            node.notices.append(notice)
            node.state = {"round": "waiting", "finished": "finished", "lease_lost": "gone"}[notice.kind]

    def settle(self, passes: int = 40, patient: bool = False, strict: bool = True) -> bool:
        """Step every live node until a whole pass changes nothing in the store or the nodes.
        ``patient``: once quiet, let time pass for every node (one patient pass) and repeat."""
        for _ in range(passes):
            if not self._quiet(passes, strict):
                return False
            if not patient or not self._pass(patient=True):
                return True
        if strict:
            raise AssertionError(f"time keeps changing things after {passes} patient passes: {self.describe()}")
        return False

    def _quiet(self, passes: int, strict: bool) -> bool:
        for _ in range(passes):
            if not self._pass(patient=False):
                return True
        if strict:
            raise AssertionError(f"no quiet state after {passes} passes: {self.describe()}")
        return False

    def _pass(self, patient: bool) -> bool:
        """Step every node once; True when anything changed."""
        before = (self.store.get("/")[1], [(n.state, len(n.assignments)) for n in self.nodes.values()])
        for node in list(self.nodes.values()):
            self.step(node, patient)
        return (self.store.get("/")[1], [(n.state, len(n.assignments)) for n in self.nodes.values()]) != before

    def live(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.state in ("waiting", "running")]

    def expire(self, victim: Node) -> None:
        """The victim's lease expires in etcd: every other live lease was refreshed in time."""
        victim.p.close()
        victim.state = "gone"
        self.etcd_clock.advance(1)
        for node in self.live():
            self.store.keepalive(node.p.session.lease)  # type: ignore[union-attr]
            self.store.keepalive(node.p.leases.presence.lease)  # type: ignore[union-attr]
        self.etcd_clock.advance(TTL - 0.5)
        self.store.expire_leases()

    def expire_dead(self) -> None:
        """Every lease not kept alive by a live node expires (stopped nodes, finished ones)."""
        self.etcd_clock.advance(1)
        for node in self.live():
            self.store.keepalive(node.p.session.lease)  # type: ignore[union-attr]
            self.store.keepalive(node.p.leases.presence.lease)  # type: ignore[union-attr]
        self.etcd_clock.advance(TTL - 0.5)
        self.store.expire_leases()

    def check_liveness(self) -> None:
        s = self.settings
        live = {k for k, n in self.nodes.items() if n.state in ("waiting", "running")}
        if self.store.get(s.status_key)[0] is not None:
            assert not live, f"job finished but still live: {self.describe()}"
            return
        if not live:
            return
        rnd = self.round()
        running = {k for k, n in self.nodes.items() if n.state == "running"}
        if len(live) < s.min_nodes:
            assert rnd.is_open and not running, self.describe()
            return
        assert not rnd.is_open, self.describe()
        members = set(rnd.assignment.node_ids)  # type: ignore[union-attr]
        assert running == members, self.describe()
        assert all(self.nodes[k].assignments[-1].round == rnd.number for k in running)
        assert live == running or len(members) == s.max_nodes, self.describe()

    def leave(self, node: Node, reason: str | None = "preempted") -> None:
        node.p.leave(reason)
        node.state = "gone"

    def close(self) -> None:
        for node in self.nodes.values():
            node.p.close()
        self.store.close()

    def round(self) -> RoundState:
        kv, _ = self.store.get(self.settings.round_key)
        assert kv is not None
        return round_members.load(self.store, self.settings, kv)[0]

    def describe(self) -> str:
        return f"round={self.round()} nodes={ {k: n.state for k, n in self.nodes.items()} }"

    # --- invariants over the whole history -------------------------------------------------
    def check_invariants(self) -> None:
        s = self.settings
        rounds = self._rounds_written()
        assert not [e for e in self.events if e.key == s.round_key and e.kind == DELETE], "round key deleted"
        closed: dict[int, RoundState] = {}
        opened: dict[int, RoundState] = {}
        prev: RoundState | None = None
        for rev, rnd in rounds:
            table = closed if rnd.state == RoundPhase.CLOSED else opened
            if rnd.state == RoundPhase.CLOSED and prev is not None and prev.state == RoundPhase.CLOSED \
                    and prev.number == rnd.number:
                # A closed round amended in place (a grow request, a stop step): same assignment.
                assert rnd.assignment == prev.assignment, f"round {rnd.number} reassigned: {prev} / {rnd}"
                prev = rnd
                continue
            assert rnd.number not in table, f"round {rnd.number} written {rnd.state} twice: {table[rnd.number]} / {rnd}"
            table[rnd.number] = rnd
            # every write moves the round one step: open n -> closed n -> open n+1
            if prev is None:
                assert (rnd.number, rnd.state, rnd.reason) == (1, RoundPhase.OPEN, "start")
            elif prev.state == RoundPhase.OPEN:
                assert (rnd.number, rnd.state) == (prev.number, RoundPhase.CLOSED), f"{prev} -> {rnd}"
            else:
                assert (rnd.number, rnd.state) == (prev.number + 1, RoundPhase.OPEN), f"{prev} -> {rnd}"
                assert rnd.previous == prev.assignment.node_ids  # type: ignore[union-attr]
            if rnd.state == RoundPhase.CLOSED:
                self._check_closed(rev, rnd)
            prev = rnd
        # what every node was told is exactly what was written
        for node_id, node in self.nodes.items():
            for a in node.assignments:
                assert closed[a.round].assignment == a, f"{node_id} got {a}, record says {closed[a.round]}"
                assert node_id in a.node_ids
        # the restart budget is charged once per worker-failure round that every previous member rejoined
        charged = [r for r in closed.values()
                   if reason_kind(r.reason) == "worker_failure" and set(r.previous) <= set(r.assignment.node_ids)]
        kv, _ = self.store.get(s.restarts_key)
        count = RestartCount.decode(kv.key, kv.value).count if kv else 0
        assert count == len(charged)
        if s.max_restarts is not None:
            assert count <= s.max_restarts
        statuses = [JobStatus.decode(e.key, e.value) for e in self.events if e.key == s.status_key and e.kind == PUT]
        assert len(statuses) <= 1, statuses

    def _rounds_written(self) -> list[tuple[int, RoundState]]:
        """Every round record written, with its assignment from the members key written in the
        same transaction and ``previous`` from the round before (neither is on the record)."""
        s = self.settings
        members = {(e.mod_revision, e.key): e for e in self.events if e.kind == PUT and e.key.endswith("/members")}
        rounds: list[tuple[int, RoundState]] = []
        previous: tuple[str, ...] = ()  # the rank order of the last closed round
        for e in self.events:
            if e.key != s.round_key or e.kind != PUT:
                continue
            rnd = RoundState.decode(e.key, e.value)
            prior = rounds[-1][1] if rounds else None
            if rnd.is_open:
                rnd = replace(rnd, previous=previous)
            else:
                m = members.get((e.mod_revision, s.members_key(rnd.number)))
                if m is not None:
                    rnd = rnd.with_members(m.key, m.value)
                elif prior is not None and prior.number == rnd.number:  # amended in place
                    rnd = replace(rnd, assignment=prior.assignment)
                rnd = replace(rnd, previous=prior.previous if prior is not None else ())
                previous = rnd.assignment.node_ids if rnd.assignment else previous
            rounds.append((e.mod_revision, rnd))
        return rounds

    def _check_closed(self, rev: int, rnd: RoundState) -> None:
        s = self.settings
        a = rnd.assignment
        assert a is not None and a.round == rnd.number
        ids = a.node_ids
        assert len(set(ids)) == len(ids), f"a node ranked twice in round {rnd.number}: {ids}"
        assert s.min_nodes <= len(ids) <= s.max_nodes, f"round {rnd.number}: {len(ids)} members"
        assert not set(a.standbys) & set(ids)
        assert len(ids) == s.max_nodes or not a.standbys  # standbys only when the round is full
        # every member (and standby) joined this very round before it closed
        joined = {e.key.rsplit("/", 1)[-1] for e in self.events
                  if e.kind == PUT and e.mod_revision < rev and e.key.startswith(s.joined_prefix(rnd.number))}
        assert set(ids) | set(a.standbys) <= joined, f"round {rnd.number}: {ids} but joined {joined}"
        # survivors keep their relative order, ahead of newcomers
        survivors = [n for n in rnd.previous if n in ids]
        assert list(ids[: len(survivors)]) == survivors, f"{rnd.previous} -> {ids}"
        assert a.master_addr == a.members[0].addr


@pytest.fixture(autouse=True)
def short_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    """A patient step waits for events at most TICK of real time per loop: keep it short."""
    monkeypatch.setattr(participant_module, "TICK", 0.001)


@pytest.fixture
def make_cluster() -> Iterator:
    made: list[Cluster] = []

    def make(*args: object, **kw: object) -> Cluster:
        c = Cluster(*args, **kw)  # type: ignore[arg-type]
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# --- scenarios -------------------------------------------------------------------------------------
def test_min_reached_closes_on_last_call(make_cluster) -> None:
    c = make_cluster(2, 3, last_call=1.0)
    a, b = c.add(), c.add()
    c.settle()
    assert a.state == b.state == "waiting" and c.round().is_open  # the last call is still running
    c.settle(patient=True)
    assert a.assignments == b.assignments and len(a.assignments) == 1
    assert a.assignments[0].node_ids == ("n00", "n01")
    c.check_invariants()


def test_start_round_waits_for_max_while_last_call_runs(make_cluster) -> None:
    c = make_cluster(2, 3, last_call=100.0)  # node clocks never reach the last call
    a, b = c.add(), c.add()
    c.settle()
    assert a.state == b.state == "waiting" and c.round().is_open
    d = c.add()
    c.settle()
    assert [n.state for n in (a, b, d)] == ["running"] * 3
    assert a.assignments[0].node_ids == ("n00", "n01", "n02")
    c.check_invariants()


def test_beyond_max_waits_as_standby_until_a_member_leaves(make_cluster) -> None:
    c = make_cluster(1, 2, last_call=100.0)
    a, b = c.add(), c.add()
    c.settle()
    s = c.add()
    c.settle()
    assert s.state == "waiting" and not s.assignments
    c.leave(a)
    c.settle()
    assert b.assignments[-1].node_ids == ("n01", "n02")
    assert s.assignments[-1] == b.assignments[-1]
    assert c.round().reason.startswith("node_left: n00")
    c.check_invariants()


def test_lease_expiry_opens_a_round_without_the_lost_member(make_cluster) -> None:
    c = make_cluster(1, 3, last_call=100.0)
    a, b, d = c.add(), c.add(), c.add()
    c.settle()
    c.expire(b)
    c.settle()
    assert [n.notices[-1].kind for n in (a, d)] == ["round", "round"]
    assert c.round().reason == "node_lost: n01"
    assert a.assignments[-1].node_ids == ("n00", "n02") == d.assignments[-1].node_ids
    c.check_invariants()


def test_scale_up_admits_a_newcomer_when_below_max(make_cluster) -> None:
    c = make_cluster(1, 3, last_call=1.0, cooldown=0.0)
    a = c.add()
    c.settle(patient=True)
    b = c.add()
    c.settle()
    assert c.round().reason == "scale_up: n01 is waiting"
    assert a.assignments[-1].node_ids == ("n00", "n01") == b.assignments[-1].node_ids
    c.check_invariants()


def test_scale_up_waits_for_the_cooldown(make_cluster) -> None:
    c = make_cluster(1, 3, last_call=1.0, cooldown=1.0)
    c.add()
    c.settle(patient=True)
    b = c.add()
    c.settle()
    assert b.state == "waiting" and c.round().number == 1  # no time passed: the cool-down holds
    c.step(b, patient=True)
    c.settle()
    assert b.state == "running" and c.round().number == 2
    c.check_invariants()


def test_worker_failure_charges_the_budget_once(make_cluster) -> None:
    c = make_cluster(2, 2, max_restarts=1)
    a, b = c.add(), c.add()
    c.settle()
    a.p.request_new_round("worker_failure: rank 0 exited 1")
    c.settle()
    assert a.assignments[-1].round == 2 and b.assignments[-1].round == 2
    kv, _ = c.store.get(c.settings.restarts_key)
    assert RestartCount.decode(kv.key, kv.value) == RestartCount(1, "worker_failure: rank 0 exited 1")
    b.p.request_new_round("worker_failure: again")
    c.settle()
    assert a.state == b.state == "finished"
    kv, _ = c.store.get(c.settings.status_key)
    status = JobStatus.decode(kv.key, kv.value)
    assert status.outcome == Outcome.FAILED and "restart budget spent (1 of 1 used)" in status.reason
    c.check_invariants()


def test_report_done_by_all_members_succeeds_the_job(make_cluster) -> None:
    c = make_cluster(2, 2)
    a, b = c.add(), c.add()
    c.settle()
    assert a.p.report_done() is False
    assert b.p.report_done() is True
    c.settle()
    assert a.notices[-1].kind == b.notices[-1].kind == "finished"
    assert a.notices[-1].status.outcome == Outcome.SUCCEEDED  # type: ignore[union-attr]
    late = c.add(start=False)
    with pytest.raises(JobFinishedError) as info:
        late.p.start()
    assert info.value.outcome == Outcome.SUCCEEDED
    assert c.store.get(c.settings.node_key(late.p.node_id))[0] is None  # it left nothing behind


def test_corrupt_join_record_stops_the_coordinator_with_a_named_error(make_cluster) -> None:
    c = make_cluster(2, 2)
    a = c.add()
    c.step(a)
    bad = c.settings.joined_key(1, "intruder")
    c.store.put(bad, b'{"v": 9}')
    with pytest.raises(CorruptStateError) as info:
        for _ in range(3):
            c.step(a)
    assert str(info.value) == f"etcd key {bad!r}: expected \"v\": 1 (join record), found \"v\": 9"


# --- bugs found by these tests --------------------------------------------------------------------
def test_standby_takes_over_when_the_only_member_dies(make_cluster) -> None:
    c = make_cluster(1, 1)
    a = c.add()
    c.settle()
    s = c.add()
    c.settle()
    assert s.state == "waiting"
    c.expire(a)
    c.settle()
    assert s.state == "running", c.describe()


def test_a_standby_polled_in_short_calls_names_the_member_it_lost(make_cluster) -> None:
    c = make_cluster(1, 1)
    a = c.add()
    c.settle()
    s = c.add()
    c.settle()  # many next_assignment(timeout=0) calls on one wait: the standby's watch outlives them
    c.expire(a)
    c.settle()
    assert s.state == "running"
    assert c.round().reason == f"node_lost: {a.p.node_id}"  # was "node_lost: None"


def _member_b_with_follower_race(c: Cluster, race: bool) -> tuple[Node, Node]:
    """Round 2 (a, b; s standby) where b followed s while joining. With ``race``, s moves on to
    round 3 (deleting its round-2 key, which b follows) while b is still inside next_assignment:
    an interleaving any two real nodes can run into."""
    a, b = c.add("a"), c.add("b")
    c.settle()
    assert a.assignments[-1].node_ids == ("a", "b")
    s = c.add("s")  # standby, pre-joined to round 2
    c.settle()
    a.p.request_new_round("worker_failure: boom")  # round 2 opens; joins: s, then b, then a
    for node in (b, b, a, a, s, s):
        c.step(node)  # b joins and follows s; a follows b; s coordinates and closes round 2
    assert c.round().assignment.node_ids == ("a", "b")  # type: ignore[union-attr]
    ticks = iter([lambda: c.step(s)] if race else [])
    b.assignments.append(b.p.next_assignment(timeout=5, on_tick=lambda: next(ticks, lambda: None)()))
    b.state = "running"
    c.settle()
    assert b.state == "running" and s.state == "waiting"
    return a, b


def test_member_notices_its_ring_predecessor_dying(make_cluster) -> None:
    c = make_cluster(2, 2)
    a, b = _member_b_with_follower_race(c, race=False)
    c.expire(a)
    notice = b.p.poll(0)
    assert notice is not None and notice.kind == "round" and notice.detail == "node_lost: a"


def test_stale_follower_event_does_not_blind_the_member_watch(make_cluster) -> None:
    c = make_cluster(2, 2)
    a, b = _member_b_with_follower_race(c, race=True)
    c.expire(a)  # b's ring predecessor dies
    notice = b.p.poll(0)
    assert notice is not None and notice.kind == "round", c.describe()


def test_scale_up_with_zero_last_call_keeps_the_running_member(make_cluster) -> None:
    c = make_cluster(1, 3, last_call=0.0, cooldown=0.0)
    a = c.add()
    c.settle()
    b = c.add()
    c.settle()
    assert a.assignments[-1].node_ids == ("n00", "n01") == b.assignments[-1].node_ids, c.describe()


def test_scale_up_round_does_not_wait_forever_for_a_hung_member(make_cluster) -> None:
    c = make_cluster(1, 3, last_call=1.0, cooldown=0.0)
    a, b = c.add("a"), c.add("b")
    c.settle(patient=True)
    assert a.assignments[-1].node_ids == ("a", "b")
    b.state = "hung"  # its lease stays alive, its loop never runs again
    c.add("d")
    c.settle(patient=True, passes=10, strict=False)
    rnd = c.round()
    assert rnd.number == 2 and rnd.reason.startswith("scale_up")
    assert not rnd.is_open, f"the job is stopped for good: {c.describe()}"


def test_spent_budget_does_not_overwrite_a_recorded_outcome(make_cluster) -> None:
    c = make_cluster(1, 1, max_restarts=0)
    a = c.add()
    c.settle()
    a.p.request_new_round("worker_failure: rank 1 exited 1")  # round 2 opens...
    assert a.p.report_done() is True  # ...and the job is recorded as succeeded before anyone closes it
    c.step(a)  # poll: the round moved on
    c.step(a)  # next_assignment: a coordinates round 2 and finds the budget spent
    statuses = [JobStatus.decode(e.key, e.value) for e in c.events if e.key == c.settings.status_key]
    assert [s.outcome for s in statuses] == [Outcome.SUCCEEDED], statuses


# --- the property ----------------------------------------------------------------------------------
ACTIONS = st.one_of(
    st.just(("add",)),
    st.tuples(st.just("settle")),
    st.tuples(st.just("step"), st.integers(0, 20)),
    st.tuples(st.just("step"), st.integers(0, 20)),
    st.tuples(st.just("wait"), st.integers(0, 20)),  # time passes for one node (last call, cool-down)
    st.tuples(st.just("settle")),
    st.tuples(st.just("leave"), st.integers(0, 20)),
    st.tuples(st.just("close"), st.integers(0, 20)),  # stop without leaving: the lease must expire
    st.tuples(st.just("expire"), st.integers(0, 20)),
    st.tuples(st.just("fail"), st.integers(0, 20)),
    st.tuples(st.just("done"), st.integers(0, 20)),
)


@st.composite
def configs(draw: st.DrawFn) -> dict[str, object]:
    mn = draw(st.integers(1, 3))
    return dict(initial=draw(st.integers(mn, 6)), settle_first=draw(st.booleans()), min_nodes=mn, max_nodes=draw(st.integers(mn, 4)), last_call=1.0,
                cooldown=draw(st.sampled_from([0.0, 1.0, 100.0])), max_restarts=draw(st.sampled_from([None, 0, 2])))


def run_actions(c: Cluster, initial: int, settle_first: bool, actions: list[tuple]) -> None:
    for _ in range(initial):
        c.add()
    if settle_first:
        c.settle(patient=True, strict=False)
    for action in actions:
        live = c.live()
        if action[0] == "add":
            if len(c.nodes) < 8:
                c.add()
            continue
        if action[0] == "settle":
            c.settle(strict=False)
            continue
        if not live:
            continue
        node = live[action[1] % len(live)]
        if action[0] == "step":
            c.step(node)
        elif action[0] == "wait":
            c.step(node, patient=True)
        elif action[0] == "leave":
            c.leave(node, "preempted" if action[1] % 2 else None)
        elif action[0] == "close":
            node.p.close()
            node.state = "gone"
        elif action[0] == "expire":
            c.expire(node)
        elif action[0] == "fail" and node.state == "running":
            node.p.request_new_round("worker_failure: injected")
            node.state = "waiting"  # as an agent does: stop the workers, rendezvous again
        elif action[0] == "done" and node.state == "running":
            node.p.report_done()


PROPERTY = hsettings(max_examples=300, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@PROPERTY
@given(configs(), st.lists(ACTIONS, min_size=1, max_size=60))
def test_any_history_has_one_assignment_per_round(conf: dict[str, object], actions: list[tuple]) -> None:
    initial, settle_first = conf.pop("initial"), conf.pop("settle_first")
    c = Cluster(conf.pop("min_nodes"), conf.pop("max_nodes"), **conf)  # type: ignore[arg-type]
    try:
        run_actions(c, initial, settle_first, actions)  # type: ignore[arg-type]
        c.settle(patient=True, strict=False)  # liveness is the next test's business
        c.check_invariants()
        closes = sum(1 for e in c.events if e.key == c.settings.round_key and b'"closed"' in e.value)
        event(f"rounds closed: {min(closes, 4)}{'+' if closes >= 4 else ''}")
        kv, _ = c.store.get(c.settings.round_key)
        event(f"final round: {RoundState.decode(kv.key, kv.value).reason.split(':')[0] if kv else '-'}")
    finally:
        c.close()


@PROPERTY
@given(configs(), st.lists(ACTIONS, min_size=1, max_size=60))
def test_any_history_settles_with_every_live_node_placed(conf: dict[str, object], actions: list[tuple]) -> None:
    """Once the dead are gone and time passes, the job is in a closed round run by exactly its
    members, the other live nodes wait only as standbys of a full round; or, below min, the
    round is open; or the job has an outcome every node has learned."""
    initial, settle_first = conf.pop("initial"), conf.pop("settle_first")
    conf["cooldown"] = min(conf["cooldown"], 1.0)  # type: ignore[type-var]
    c = Cluster(conf.pop("min_nodes"), conf.pop("max_nodes"), **conf)  # type: ignore[arg-type]
    try:
        run_actions(c, initial, settle_first, actions)  # type: ignore[arg-type]
        c.expire_dead()
        c.settle(patient=True)
        c.check_invariants()
        c.check_liveness()
    finally:
        c.close()
