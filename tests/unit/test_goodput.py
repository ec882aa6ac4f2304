"""Goodput accounting as tables: a script of (time, event) in, seconds by bucket out.

Time is injected; nothing sleeps. Events mirror what the agent's loop reports through
AgentMetrics: state transitions, workers started/stopped, the group's completed step.
"""

from __future__ import annotations

import json

import pytest

from agent.observe.goodput import (
    BADPUT_REASONS,
    GoodputAccount,
    NodeReport,
    Totals,
    goodput_key,
    job_totals,
    load,
    persist,
)
from rendezvous.errors import CorruptStateError
from rendezvous.memory_store import MemoryStore
from rendezvous.settings import Settings
from rendezvous.state import RestartCount


def play(script: list[tuple[float, str, object]], base: Totals | None = None) -> GoodputAccount:
    acc = GoodputAccount(base)
    for now, event, arg in script:
        if event == "state":
            acc.state(str(arg), now)
        elif event == "start":
            acc.workers_started(now)
        elif event == "stop":
            acc.workers_stopped(now)
        elif event == "step":
            acc.step(int(arg), now)  # type: ignore[call-overload]
        elif event == "below_min":
            acc.below_min(bool(arg), now)
        else:
            raise AssertionError(event)
    return acc


def bad(**kw: float) -> dict[str, float]:
    out = {r: 0.0 for r in BADPUT_REASONS}
    out.update(kw)
    return out


FIRST_RUN = [
    (0, "state", "initializing"),
    (1, "state", "rendezvous"),     # elapsed starts here
    (3, "start", None),             # 2 s of rendezvous
    (3, "state", "running"),
    (7, "step", 0),                 # 4 s startup (process start, restore, first step)
    (8, "step", 1),
    (10, "step", 3),                # 3 s productive so far
]

CASES = {
    "first run: rendezvous, startup, then productive steps": (
        FIRST_RUN, 10, Totals(9, 3, bad(rendezvous=2, startup=4), 3)),
    "the step in progress is pending: in elapsed only": (
        FIRST_RUN, 10.5, Totals(9.5, 3, bad(rendezvous=2, startup=4), 3)),
    "initializing and time before it are not counted": (
        [(5, "state", "initializing"), (9, "state", "rendezvous")], 10, Totals(1, 0, bad(rendezvous=1), -1)),
    "worker failure: unfinished step lost, restart redoes steps 2-3 (checkpoint of step 1)": (
        FIRST_RUN + [
            (10.5, "state", "restarting"),  # 0.5 s into step 4: lost
            (11, "stop", None),            # 0.5 s stopping the workers: drain
            (11, "state", "rendezvous"),
            (12, "start", None),           # 1 s rendezvous
            (12, "state", "running"),
            (14, "step", 2),               # 2 s startup; first step after restore is 2
            (15, "step", 3),               # redo of step 3: lost progress
            (16, "step", 4),               # new: productive
        ], 16, Totals(15, 4, bad(rendezvous=3, startup=6, lost_progress=1.5, drain=0.5), 4)),
    "steps reported in a burst are split between redone and new work": (
        FIRST_RUN + [
            (10, "state", "restarting"), (10, "stop", None), (10, "state", "rendezvous"),
            (10, "start", None), (10, "state", "running"),
            (11, "step", 1),               # restored from the checkpoint of step 0
            (15, "step", 5),               # steps 2-3 redone, 4-5 new: 2 s each way
        ], 15, Totals(14, 5, bad(rendezvous=2, startup=5, lost_progress=2), 5)),
    "waiting below min nodes is its own bucket, back to rendezvous when enough": (
        [(0, "state", "rendezvous"), (2, "below_min", True), (12, "below_min", False)], 13,
        Totals(13, 0, bad(rendezvous=3, below_min_nodes=10), -1)),
    "below-min flag is dropped when the rendezvous ends": (
        [(0, "state", "rendezvous"), (1, "below_min", True), (2, "start", None), (2, "state", "running")],
        3, Totals(3, 0, bad(below_min_nodes=1, rendezvous=1, startup=1), -1)),
    "a drain finishing its step keeps it productive": (
        FIRST_RUN + [
            (10.4, "state", "restarting"),  # scale-up: drain requested mid-step
            (10.6, "step", 4),             # the step completes during the drain
            (12, "stop", None),            # checkpoint and exit
            (12, "state", "rendezvous"),
        ], 12, Totals(11, 3.4, bad(rendezvous=2, startup=4, drain=1.6), 4)),
    "a scale-up drain continues while the agent already waits in the rendezvous": (
        FIRST_RUN + [
            (10, "state", "restarting"), (10, "state", "rendezvous"),  # rejoins at once
            (12, "stop", None),            # the workers drained and exited
            (13, "start", None), (13, "state", "running"),
        ], 13, Totals(12, 3, bad(rendezvous=3, startup=4, drain=2), 3)),
    "a hang is lost progress once the workers are stopped": (
        FIRST_RUN + [(40, "state", "restarting"), (41, "stop", None), (41, "state", "rendezvous")],
        41, Totals(40, 3, bad(rendezvous=2, startup=4, lost_progress=30, drain=1), 3)),
    "the tail of a successful job is productive, and the clock stops": (
        FIRST_RUN + [(11, "stop", None), (11, "state", "succeeded")], 50,
        Totals(10, 4, bad(rendezvous=2, startup=4), 3)),
    "fenced (lease lost) with workers stopped while still 'running': rejoin time is rendezvous": (
        FIRST_RUN + [(10.5, "stop", None), (14, "state", "rendezvous")], 14,
        Totals(13, 3, bad(rendezvous=5.5, startup=4, lost_progress=0.5), 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_accounting_table(name: str) -> None:
    script, now, expected = CASES[name]
    got = play(script).totals(now)  # type: ignore[arg-type]
    assert got.elapsed == pytest.approx(expected.elapsed)
    assert got.productive == pytest.approx(expected.productive)
    assert got.badput == pytest.approx(expected.badput)
    assert got.highest_step == expected.highest_step
    # Nothing is counted twice; the rest of elapsed is the step in progress.
    assert got.productive + sum(got.badput.values()) <= got.elapsed + 1e-9


def test_counters_never_decrease_whatever_the_order_of_reads() -> None:
    script = CASES["worker failure: unfinished step lost, restart redoes steps 2-3 (checkpoint of step 1)"][0]
    acc = GoodputAccount()
    previous = Totals()
    t = 0.0
    events = list(script)  # type: ignore[arg-type]
    while t <= 17:
        while events and events[0][0] <= t:
            now, event, arg = events.pop(0)
            {"state": lambda: acc.state(str(arg), now), "start": lambda: acc.workers_started(now),
             "stop": lambda: acc.workers_stopped(now), "step": lambda: acc.step(int(arg), now)}[event]()
        got = acc.totals(t)
        assert got.elapsed >= previous.elapsed and got.productive >= previous.productive
        assert all(got.badput[r] >= previous.badput[r] - 1e-9 for r in BADPUT_REASONS), (t, got, previous)
        previous = got
        t += 0.25


def test_base_from_an_earlier_run_is_added_and_its_highest_step_marks_redone_work() -> None:
    base = Totals(100, 80, bad(rendezvous=20), highest_step=50)
    acc = play([(0, "state", "rendezvous"), (1, "start", None), (1, "state", "running"),
                (2, "step", 45), (7, "step", 50), (8, "step", 51)], base=base)
    got = acc.totals(8)
    assert got.elapsed == pytest.approx(108)
    assert got.productive == pytest.approx(81)
    assert got.badput["lost_progress"] == pytest.approx(5)
    assert got.ratio == pytest.approx(81 / 108)


def test_ratio_is_zero_before_any_time_and_capped_at_one() -> None:
    assert Totals().ratio == 0.0
    assert Totals(1.0, 1.0000001).ratio == 1.0


# --- the record in etcd -----------------------------------------------------------------------

SETTINGS = Settings(job_id="gp", min_nodes=1, max_nodes=2)


def report(node: str, elapsed: float, productive: float, **kw: object) -> NodeReport:
    return NodeReport(node, Totals(elapsed, productive, bad(rendezvous=elapsed - productive), 7), **kw)  # type: ignore[arg-type]


def test_persist_then_load_round_trips_and_job_totals_sum_nodes() -> None:
    store = MemoryStore(reap_interval=None)
    a = report("a", 100, 60, state="running", last_step=7, last_step_time=1.5e9, checkpoint_step=5,
               checkpoint_time=1.5e9 - 10, max_restarts=3, time=1.5e9)
    assert persist(store, SETTINGS, "a", a) == 0
    store.put(SETTINGS.restarts_key, RestartCount(2, "worker_failure: x").encode())
    assert persist(store, SETTINGS, "b", report("b", 50, 40)) == 2
    kv, _ = store.get(goodput_key(SETTINGS, "a"))
    assert kv is not None and kv.lease == 0 and json.loads(kv.value)["v"] == 1
    loaded = load(store, SETTINGS)
    assert loaded["a"] == a
    total = job_totals(loaded)
    assert (total.elapsed, total.productive) == (150, 100)
    assert total.ratio == pytest.approx(100 / 150)


def test_a_corrupt_record_is_skipped_by_load_and_named_by_decode() -> None:
    store = MemoryStore(reap_interval=None)
    persist(store, SETTINGS, "a", report("a", 10, 5))
    store.put(goodput_key(SETTINGS, "zzz"), b'{"v": 2}')
    assert list(load(store, SETTINGS)) == ["a"]
    with pytest.raises(CorruptStateError, match=r"goodput/zzz.*\"v\": 1"):
        NodeReport.decode(goodput_key(SETTINGS, "zzz"), b'{"v": 2}')
    with pytest.raises(CorruptStateError, match="'elapsed' as a number >= 0"):
        NodeReport.decode("k", b'{"v": 1, "node_id": "a", "elapsed": -1, "productive": 0, "badput": {},'
                               b' "highest_step": 0}')
