"""rendezvous.protocol.decide: the pure decisions, as tables (no store, no clock, no threads)."""

from __future__ import annotations

import pytest

from rendezvous.protocol import decide
from rendezvous.protocol.decide import (
    Close,
    Coordinate,
    Hold,
    Join,
    Joiner,
    Reopen,
    RoundView,
    Serve,
    Snapshot,
    Standby,
    Wait,
)
from rendezvous.reasons import reason_kind
from rendezvous.settings import Settings
from rendezvous.state import Assignment, JoinRecord, Member, RoundPhase, RoundState

NOW = 100.0


def settings(min_nodes: int = 2, max_nodes: int = 4, **kw: object) -> Settings:
    return Settings(job_id="job", min_nodes=min_nodes, max_nodes=max_nodes, **kw)  # type: ignore[arg-type]


def joiner(node_id: str, rev: int, nproc: int = 8) -> Joiner:
    return Joiner(JoinRecord(node_id, f"{node_id}.addr", nproc, 29000 + rev), rev)


def joiners(*ids: str) -> tuple[Joiner, ...]:
    return tuple(joiner(n, 10 + i) for i, n in enumerate(ids))


def view(ids: tuple[str, ...], alive: tuple[str, ...] | None = None, reason: str = "start",
         previous: tuple[str, ...] = (), last_join_seen: float = NOW, number: int = 1) -> RoundView:
    rnd = RoundState(number=number, state=RoundPhase.OPEN, reason=reason, previous=previous)
    return RoundView(rnd, joiners(*ids), frozenset(ids if alive is None else alive), last_join_seen)


def closed(number: int, *ids: str, standbys: tuple[str, ...] = (), reason: str = "start") -> RoundState:
    members = tuple(Member(n, f"{n}.addr", 8) for n in ids)
    a = Assignment(number, members, f"{ids[0]}.addr" if ids else "", 29500, standbys)
    return RoundState(number, RoundPhase.CLOSED, reason, (), a)


# --- next_step: what a node waiting for an assignment does next -----------------------------------
def open_round(number: int) -> RoundState:
    return RoundState(number, RoundPhase.OPEN, "start" if number == 1 else "node_lost: x")


R1_WITH_ME = closed(1, "me", "b")
R1_WITHOUT_ME = closed(1, "a", "b", standbys=("me",))
BOOM = Reopen(1, "worker_failure: boom")

# (round, joined, served, reopen, expected step)
STEP_TABLE = [
    # an open round: join it, then take part in closing it
    (open_round(1), None, 0, None, Join(1)),
    (open_round(1), 1, 0, None, Coordinate(1)),
    (open_round(3), 2, 1, None, Join(3)),  # our join key is in a round the job has moved past
    (open_round(2), 2, 1, None, Coordinate(2)),  # pre-joined as a standby: already in
    # a closed round we joined and are a member of: hand out its assignment, once
    (R1_WITH_ME, 1, 0, None, Serve(R1_WITH_ME.assignment)),  # type: ignore[arg-type]
    (R1_WITH_ME, 1, 1, None, Hold("round 1 already served; waiting for the next one to open")),
    # a member of a closed round that did not join it (it rejoined after losing its lease): next round
    (R1_WITH_ME, None, 0, None, Join(2)),
    # a closed round without us: pre-join the next one and wait as a standby
    (R1_WITHOUT_ME, 1, 0, None, Join(2)),
    (R1_WITHOUT_ME, None, 0, None, Join(2)),
    (R1_WITHOUT_ME, 2, 0, None, Standby(1)),
    # a reopen we owe: keep opening the next round until someone has
    (R1_WITH_ME, 1, 1, BOOM, BOOM),
    (R1_WITH_ME, None, 0, BOOM, BOOM),
    (open_round(2), 1, 1, BOOM, Join(2)),  # moved past: the reopen is done
    (closed(2, "me"), 2, 1, BOOM, Serve(closed(2, "me").assignment)),  # type: ignore[arg-type]
    (open_round(1), 1, 0, BOOM, Hold("round 1 is open, not yet past round 1")),  # the key went back
]


@pytest.mark.parametrize("rnd,joined,served,reopen,expected", STEP_TABLE)
def test_next_step_table(rnd: RoundState, joined: int | None, served: int, reopen: Reopen | None,
                         expected: object) -> None:
    assert decide.next_step(Snapshot(rnd, "me", joined, served, reopen)) == expected


@pytest.mark.parametrize("rnd,joined,expected", [
    (open_round(4), None, 4),
    (open_round(4), 3, 4),
    (R1_WITH_ME, 1, 1),
    (R1_WITH_ME, None, 2),  # a member, but not by this join
    (R1_WITHOUT_ME, 1, 2),  # joined, but beyond max: a standby of the next round
    (RoundState(1, RoundPhase.CLOSED, "start"), 1, 2),  # closed without an assignment
])
def test_target_round(rnd: RoundState, joined: int | None, expected: int) -> None:
    assert decide.target_round(rnd, "me", joined) == expected


def test_a_reopen_is_outstanding_until_the_round_moves_past_it() -> None:
    assert decide.outstanding(BOOM, closed(1, "me")) == BOOM
    assert decide.outstanding(BOOM, open_round(2)) is None
    assert decide.outstanding(None, closed(1, "me")) is None


# --- close_decision -------------------------------------------------------------------------
# (min, max, joined, alive, reason, last_join_seen, last_call, expected type, why contains)
CLOSE_TABLE = [
    # below min: wait for an event, no deadline
    (2, 4, ("a",), None, "start", NOW, 1.0, Wait, "1 of at least 2"),
    (3, 4, ("a", "b"), ("a", "b"), "node_lost: c", NOW - 99, 1.0, Wait, "2 of at least 3"),
    (1, 1, (), None, "start", NOW - 99, 0.0, Wait, "0 of at least 1"),
    # max closes at once, even in the start round and with more alive than joined
    (2, 3, ("a", "b", "c"), ("a", "b", "c", "d"), "start", NOW, 10.0, Close, "max nodes (3)"),
    (1, 1, ("a",), ("a", "b"), "start", NOW, 10.0, Close, "max nodes (1)"),
    # more than max joined: still a close (the extra become standbys)
    (1, 2, ("a", "b", "c"), None, "start", NOW, 10.0, Close, "max nodes (2)"),
    # every live node joined: at once on a re-rendezvous...
    (2, 4, ("a", "b"), ("a", "b"), "node_lost: c", NOW, 10.0, Close, "every live node (2)"),
    (2, 4, ("a", "b", "c"), ("a", "b"), "worker_failure: x", NOW, 10.0, Close, "every live node (3)"),
    (2, 4, ("a", "b"), (), "node_left: c", NOW, 10.0, Close, "every live node"),
    # ...but not in the first round (a node may not have registered yet)
    (2, 4, ("a", "b"), ("a", "b"), "start", NOW, 10.0, Wait, "last call"),
    # a live node that has not joined holds the close until the last call
    (2, 4, ("a", "b"), ("a", "b", "c"), "node_lost: d", NOW, 10.0, Wait, "last call"),
    # last call: min reached and no new node for last_call seconds
    (2, 4, ("a", "b"), ("a", "b", "c"), "node_lost: d", NOW - 10.0, 10.0, Close, "last call"),
    (2, 4, ("a", "b"), ("a", "b"), "start", NOW - 1.0, 1.0, Close, "last call"),
    (2, 4, ("a", "b"), ("a", "b"), "start", NOW - 0.999, 1.0, Wait, "last call"),
    (1, 4, ("a",), ("a",), "start", NOW, 0.0, Close, "last call"),
]


@pytest.mark.parametrize("mn,mx,ids,alive,reason,seen,last_call,kind,why", CLOSE_TABLE)
def test_close_decision_table(mn: int, mx: int, ids: tuple[str, ...], alive: tuple[str, ...] | None,
                              reason: str, seen: float, last_call: float, kind: type, why: str) -> None:
    s = settings(mn, mx, last_call=last_call)
    action = decide.close_decision(view(ids, alive, reason, last_join_seen=seen), s, NOW)
    assert isinstance(action, kind), action
    assert why in action.why


def test_close_decision_below_min_waits_for_an_event_only() -> None:
    action = decide.close_decision(view(("a",)), settings(2, 4), NOW)
    assert action == Wait(None, "1 of at least 2 nodes joined")


def test_close_decision_last_call_wait_names_its_deadline() -> None:
    action = decide.close_decision(view(("a", "b"), last_join_seen=NOW - 0.25), settings(2, 4, last_call=1.0), NOW)
    assert isinstance(action, Wait)
    assert action.until == pytest.approx(NOW + 0.75)


def test_close_writes_a_closed_round_with_assignment() -> None:
    action = decide.close_decision(view(("a", "b"), reason="node_lost: c", previous=("c", "b"), number=7),
                                   settings(2, 4), NOW)
    assert isinstance(action, Close)
    rnd = action.round
    assert (rnd.number, rnd.state, rnd.reason, rnd.previous) == (7, RoundPhase.CLOSED, "node_lost: c", ("c", "b"))
    a = rnd.assignment
    assert a is not None and a.round == 7
    assert a.node_ids == ("b", "a")  # survivor b first, newcomer a after
    assert a.members[0] == Member("b", "b.addr", 8)
    # the master is rank 0's address and the port rank 0 reserved
    assert (a.master_addr, a.master_port) == ("b.addr", 29011)
    assert a.standbys == ()


# --- rank_order -------------------------------------------------------------------------------
RANK_TABLE = [
    # previous, joined (id, create rev), expected order
    ((), (("a", 5), ("b", 6), ("c", 7)), ("a", "b", "c")),
    ((), (("c", 7), ("a", 5), ("b", 6)), ("a", "b", "c")),  # newcomers by create revision, not listing order
    (("b", "a"), (("a", 5), ("b", 6)), ("b", "a")),  # survivors keep their order even if they joined later
    (("x", "b", "y", "a"), (("a", 5), ("b", 6)), ("b", "a")),  # lost members drop out, order kept
    (("b", "a"), (("n2", 3), ("a", 9), ("n1", 4), ("b", 10)), ("b", "a", "n2", "n1")),
    (("a", "b", "c"), (), ()),
    (("a",), (("z", 1),), ("z",)),
]


@pytest.mark.parametrize("previous,joined,expected", RANK_TABLE)
def test_rank_order_table(previous: tuple[str, ...], joined: tuple[tuple[str, int], ...],
                          expected: tuple[str, ...]) -> None:
    js = tuple(joiner(n, r) for n, r in joined)
    assert tuple(j.node_id for j in decide.rank_order(previous, js)) == expected


def test_closed_round_caps_at_max_and_the_rest_are_standbys() -> None:
    rnd = RoundState(number=3, state=RoundPhase.OPEN, reason="node_lost: q", previous=("c", "a"))
    js = (joiner("d", 1), joiner("a", 2), joiner("e", 3), joiner("c", 4))
    out = decide.closed_round(RoundView(rnd, js, frozenset(), NOW), settings(1, 3))
    assert out.assignment is not None
    assert out.assignment.node_ids == ("c", "a", "d")
    assert out.assignment.standbys == ("e",)
    assert out.assignment.master_addr == "c.addr"


def test_closed_round_keeps_local_world_sizes() -> None:
    rnd = RoundState(number=1, state=RoundPhase.OPEN, reason="start")
    js = (joiner("a", 1, nproc=2), joiner("b", 2, nproc=4))
    a = decide.closed_round(RoundView(rnd, js, frozenset(), NOW), settings(1, 3)).assignment
    assert a is not None
    assert [m.nproc for m in a.members] == [2, 4]
    assert a.world_size == 6
    assert a.rank_offset("b") == 2
    assert a.group_rank("b") == 1 and a.group_rank("zz") is None


# --- next_round / first_round ------------------------------------------------------------------
def test_first_round_is_open_start() -> None:
    assert decide.first_round() == RoundState(number=1, state=RoundPhase.OPEN, reason="start")


def test_next_round_carries_rank_order_forward() -> None:
    nxt = decide.next_round(closed(4, "b", "a", "c"), "node_lost: a")
    assert (nxt.number, nxt.state, nxt.reason, nxt.previous) == (5, RoundPhase.OPEN, "node_lost: a", ("b", "a", "c"))
    assert nxt.assignment is None


def test_next_round_refuses_an_open_round() -> None:
    with pytest.raises(ValueError, match="round 2 is still open"):
        decide.next_round(RoundState(2, RoundPhase.OPEN), "x")


# --- should_scale_up ---------------------------------------------------------------------------
SCALE_TABLE = [
    # round, settings (min, max, cooldown), waiting_since, now, expected (True or Wait.until)
    (closed(1, "a"), (1, 2, 5.0), NOW, NOW, NOW + 5.0),  # cool-down not over
    (closed(1, "a"), (1, 2, 5.0), NOW, NOW + 4.99, NOW + 5.0),
    (closed(1, "a"), (1, 2, 5.0), NOW, NOW + 5.0, True),
    (closed(1, "a"), (1, 2, 0.0), NOW, NOW, True),
    (closed(1, "a", "b"), (1, 2, 0.0), NOW - 99, NOW, None),  # at max: only an event helps
    (closed(1, "a", "b", "c"), (1, 2, 0.0), NOW - 99, NOW, None),
    (RoundState(2, RoundPhase.OPEN, "x"), (1, 2, 0.0), NOW - 99, NOW, None),  # open: join it instead
    (RoundState(2, RoundPhase.CLOSED, "x"), (1, 2, 0.0), NOW - 99, NOW, None),  # closed without assignment
]


@pytest.mark.parametrize("rnd,conf,since,now,expected", SCALE_TABLE)
def test_should_scale_up_table(rnd: RoundState, conf: tuple[int, int, float], since: float, now: float,
                               expected: object) -> None:
    s = settings(conf[0], conf[1], scale_up_cooldown=conf[2])
    verdict = decide.should_scale_up(rnd, s, since, now)
    if expected is True:
        assert verdict is True
    else:
        assert isinstance(verdict, Wait)
        assert verdict.until == expected


@pytest.mark.parametrize("since,now,expected", [
    (NOW, NOW + 1.0, NOW + 1.0 + decide.READY_POLL),  # cool-down over, workers not ready: look again soon
    (NOW, NOW + decide.READY_PATIENCE - 0.01, NOW + decide.READY_PATIENCE - 0.01 + decide.READY_POLL),
    (NOW, NOW + decide.READY_PATIENCE, True),  # never blocked for good by a zygote that fails to load
    (NOW, NOW + 0.5, NOW + 1.0),  # the cool-down still comes first
])
def test_a_standby_grows_the_job_once_its_workers_are_ready(since: float, now: float, expected: object) -> None:
    """The job pauses for a newcomer only when it can take part at once: a node whose
    pre-started interpreter still imports torch waits (bounded), instead of stopping every
    rank at a step boundary to wait for it there."""
    s = settings(1, 3, scale_up_cooldown=1.0)
    verdict = decide.should_scale_up(closed(1, "a"), s, since, now, ready=False)
    if expected is True:
        assert verdict is True
    else:
        assert isinstance(verdict, Wait) and verdict.until == pytest.approx(expected)
    assert decide.should_scale_up(closed(1, "a"), s, since, max(now, NOW + 1.0), ready=True) is True


# --- ring_predecessor --------------------------------------------------------------------------
@pytest.mark.parametrize("ids,node,expected", [
    (("a", "b", "c"), "b", "a"),
    (("a", "b", "c"), "c", "b"),
    (("a", "b", "c"), "a", "c"),  # a ring: rank 0 watches the last
    (("a", "b"), "a", "b"),
    (("a", "b"), "b", "a"),
    (("a",), "a", None),  # alone: nobody to watch
    (("a", "b"), "z", None),  # not a member
])
def test_ring_predecessor(ids: tuple[str, ...], node: str, expected: str | None) -> None:
    assert decide.ring_predecessor(closed(1, *ids).assignment, node) == expected  # type: ignore[arg-type]


def test_ring_covers_every_member_exactly_once() -> None:
    a = closed(1, *[f"n{i}" for i in range(7)]).assignment
    assert a is not None
    watched = [decide.ring_predecessor(a, n) for n in a.node_ids]
    assert sorted(watched) == sorted(a.node_ids)  # type: ignore[type-var]


# --- charge_decision ---------------------------------------------------------------------------
def rnd_for_charge(reason: str, previous: tuple[str, ...] = ("a", "b")) -> RoundState:
    return RoundState(5, RoundPhase.OPEN, reason, previous)


CHARGE_TABLE = [
    # reason, joined, used, max_restarts, consume, exhausted, why contains
    ("worker_failure: exit 1", {"a", "b"}, 0, 3, True, False, "restart 1 of 3"),
    ("worker_failure: exit 1", {"a", "b", "c"}, 2, 3, True, False, "restart 3 of 3"),
    ("worker_failure: exit 1", {"a", "b"}, 3, 3, True, True, "restart budget spent (3 of 3 used)"),
    ("worker_failure: exit 1", {"a", "b"}, 0, 0, True, True, "(0 of 0 used)"),
    ("worker_failure: exit 1", {"a", "b"}, 41, None, True, False, "restart 42 of unlimited"),
    ("hang: no progress for 60s", {"a", "b"}, 0, 1, True, False, "restart 1 of 1"),
    # a previous member is missing: that node's loss, not a worker failure
    ("worker_failure: exit 1", {"a"}, 0, 3, False, False, "node lost (b)"),
    ("worker_failure: exit 1", {"a", "c"}, 3, 3, False, False, "node lost (b)"),
    # membership changes never consume the budget, spent or not
    ("node_lost: b", {"a"}, 3, 3, False, False, "membership change"),
    ("node_left: b (preempted)", {"a"}, 0, 0, False, False, "membership change"),
    ("scale_up: c is waiting", {"a", "b", "c"}, 0, 0, False, False, "membership change"),
    ("start", {"a", "b"}, 0, 0, False, False, "membership change (start)"),
    ("", {"a", "b"}, 0, 0, False, False, "membership change (start)"),
]


@pytest.mark.parametrize("reason,joined,used,max_restarts,consume,exhausted,why", CHARGE_TABLE)
def test_charge_decision_table(reason: str, joined: set[str], used: int, max_restarts: int | None,
                               consume: bool, exhausted: bool, why: str) -> None:
    charge = decide.charge_decision(rnd_for_charge(reason), frozenset(joined), used, max_restarts)
    assert (charge.consume, charge.exhausted) == (consume, exhausted)
    assert why in charge.why


def test_exhausted_charge_names_the_last_failure() -> None:
    charge = decide.charge_decision(rnd_for_charge("worker_failure: rank 3 exit 7"), frozenset("ab"), 2, 2)
    assert charge.exhausted
    assert "worker_failure: rank 3 exit 7" in charge.why


@pytest.mark.parametrize("reason,kind", [
    ("worker_failure: x: y", "worker_failure"), ("start", "start"), (" hang : z", "hang"), ("", ""),
])
def test_reason_kind(reason: str, kind: str) -> None:
    assert reason_kind(reason) == kind


# --- settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,message", [
    (dict(job_id="", min_nodes=1, max_nodes=1), "job id ('')"),
    (dict(job_id="a/b", min_nodes=1, max_nodes=1), "job id ('a/b')"),
    (dict(job_id="j", min_nodes=0, max_nodes=1), "min nodes (0) must be >= 1"),
    (dict(job_id="j", min_nodes=5, max_nodes=4), "min nodes (5) must be <= max nodes (4)"),
    (dict(job_id="j", min_nodes=1, max_nodes=1, lease_ttl=1.5), "lease ttl (1.5) must be >= 2"),
    (dict(job_id="j", min_nodes=1, max_nodes=1, last_call=-1), "last call (-1)"),
    (dict(job_id="j", min_nodes=1, max_nodes=1, max_restarts=-1), "max restarts (-1)"),
    (dict(job_id="j", min_nodes=1, max_nodes=1, scale_up_cooldown=-0.5), "scale-up cooldown (-0.5)"),
])
def test_settings_errors_name_the_values(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Settings(**kw)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_settings_key_layout() -> None:
    s = Settings(job_id="llama-ft", min_nodes=1, max_nodes=2)
    assert s.round_key == "/elastic-agent/llama-ft/round"
    assert s.node_key("n1") == "/elastic-agent/llama-ft/nodes/n1"
    assert s.joined_key(3, "n1") == "/elastic-agent/llama-ft/rounds/3/joined/n1"
    assert s.done_prefix(3) == "/elastic-agent/llama-ft/rounds/3/done/"
    assert s.status_key == "/elastic-agent/llama-ft/status"
    assert s.restarts_key == "/elastic-agent/llama-ft/restarts"
    # one job's prefix never contains another's
    assert not Settings(job_id="llama-ft2", min_nodes=1, max_nodes=1).root.startswith(s.root)


# --- a member cut off from its peers (rendezvous.protocol.reachability) is left out of the next round -----
def test_a_left_out_member_is_neither_waited_for_nor_admitted():
    rnd = decide.next_round(closed(4, "a", "b", "c"), "unreachable: c", left_out=("c",))
    assert rnd.left_out == ("c",) and rnd.previous == ("a", "b", "c")
    # c is alive (its lease holds: it reaches etcd) and even joined: the round closes without it
    # at once, not after the rejoin call nor when its presence lease runs out.
    v = RoundView(rnd, joiners("a", "b", "c"), frozenset({"a", "b", "c"}), NOW)
    out = decide.close_decision(v, settings(2, 4), NOW)
    assert isinstance(out, Close) and out.round.assignment is not None
    assert out.round.assignment.node_ids == ("a", "b") and "c" not in out.round.assignment.standbys
    v = RoundView(rnd, joiners("a", "b"), frozenset({"a", "b", "c"}), NOW)
    assert isinstance(decide.close_decision(v, settings(2, 4), NOW), Close)


def test_left_out_travels_on_the_round_record_only_while_it_matters():
    rnd = decide.next_round(closed(4, "a", "b", "c"), "unreachable: c", left_out=("c",))
    assert RoundState.decode("round", rnd.encode()).left_out == ("c",)
    assert b"left_out" not in decide.next_round(closed(4, "a", "b"), "node_lost: c").encode()
