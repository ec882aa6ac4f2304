"""Stragglers: a node's step time against the job's median (agent.observe.stragglers) and the
agent's exchange of those figures through etcd (agent.daemon.straggler_watch).

What a user notices: a node three times slower shows a ratio of ~3 on
``elastic_agent_step_time_ratio``; with ``--straggler-evict`` it is asked to leave (a planned
leave) only after staying slow for the whole window, never on one slow sample, never with
fewer than three nodes to take a median over, and never for a figure from a node outside
the round or a record that is not a figure."""

from __future__ import annotations

import json
import math

import pytest

from agent.daemon.policy import Progress
from agent.daemon.straggler_watch import StragglerWatch, group_step, interval_for
from agent.observe.metrics import AgentMetrics
from agent.observe.stragglers import MIN_SAMPLES, Comparison, StepClock, Verdict, compare, valid_figure
from rendezvous.clock import FakeClock
from rendezvous.memory_store import MemoryStore
from rendezvous.settings import Settings

SETTINGS = Settings(job_id="job", min_nodes=1, max_nodes=4)
NODES = frozenset({"n0", "n1", "n2"})


def test_step_clock_measures_seconds_per_step_and_forgets_a_restart():
    clock = StepClock(window=4)
    assert clock.figure() is None
    for step in range(10):
        clock.feed(step, 100.0 + 3.0 * step)
        clock.feed(step, 100.0 + 3.0 * step + 1)  # the same step read again: no new sample
    assert clock.figure() == pytest.approx(3.0)
    clock.feed(2, 500.0)  # resumed from an older checkpoint: the old pace no longer holds
    assert clock.figure() is None
    clock.feed(3, 501.0)
    assert clock.figure() == pytest.approx(1.0)


@pytest.mark.parametrize("figures, expected", [
    ({"n1": 1.0, "n2": 1.0}, 3.0),  # three nodes: median 1.0
    ({"n1": 1.0}, None),  # two figures: no median worth the name
    ({"n1": 1.0, "other": 1.0}, None),  # a node outside the round does not count
])
def test_compare_needs_three_members(figures, expected):
    seen = compare(3.0, figures, "n0", NODES)
    assert (None if seen is None else seen.ratio) == expected


def test_compare_ignores_a_stale_figure_of_its_own_in_etcd():
    seen = compare(1.0, {"n0": 99.0, "n1": 1.0, "n2": 1.0}, "n0", NODES)
    assert seen is not None and seen.ratio == 1.0


@pytest.mark.parametrize("raw", [None, True, "1.0", -1.0, 0.0, math.inf, math.nan, 1e9])
def test_a_figure_that_is_not_a_positive_finite_number_is_refused(raw):
    assert valid_figure(raw) is None


def test_verdict_needs_the_whole_window_and_restarts_on_any_fast_sample():
    verdict, slow, fast = Verdict(2.0, 30.0), Comparison(3.0, 1.0, 3), Comparison(1.5, 1.0, 3)
    assert not verdict.observe(slow, 0.0)
    assert not verdict.observe(slow, 20.0)
    assert not verdict.observe(fast, 25.0)  # a dip under the factor starts again
    assert not verdict.observe(slow, 30.0)
    assert not verdict.observe(None, 40.0)  # no comparison (a node left): starts again too
    for t in (50.0, 60.0, 70.0):
        assert not verdict.observe(slow, t)
    assert verdict.observe(slow, 80.0)


def test_verdict_needs_several_samples_even_in_a_long_gap():
    verdict, slow = Verdict(2.0, 10.0), Comparison(3.0, 1.0, 3)
    results = [verdict.observe(slow, t) for t in (0.0, 100.0, 200.0)]
    assert results == [False] * (MIN_SAMPLES - 1) + [True]


def test_group_step_is_the_step_every_local_rank_completed():
    assert group_step([Progress(5, 0.0, 10.0), Progress(4, 0.0, 9.0)]) == (4, 9.0, None)
    assert group_step([Progress(5, 0.0, 10.0), None]) == (None, None, None)
    assert group_step([Progress(5, 0.0, None)]) == (None, None, None)
    busy = [Progress(4, 0.0, 9.0, busy=0.5), Progress(4, 0.0, 9.5, busy=0.25)]
    assert group_step(busy) == (4, 9.5, 0.5)
    assert group_step([*busy, Progress(4, 0.0, 9.0)]) == (4, 9.5, None)


def test_interval_is_bounded():
    assert interval_for(300.0) == 10.0 and interval_for(8.0) == 2.0 and interval_for(1.0) == 1.0


def watch(store: MemoryStore, clock: FakeClock, node: str, *, evict: bool = True,
          asked: list[str] | None = None) -> tuple[StragglerWatch, AgentMetrics]:
    metrics = AgentMetrics("job", node, clock=clock.monotonic)
    sink = asked if asked is not None else []
    return StragglerWatch(store, SETTINGS, node, metrics, clock, lambda: 0, evict=evict, factor=2.0,
                          window=8.0, leave=sink.append), metrics


def ratio_of(metrics: AgentMetrics) -> float:
    value = metrics.registry.get_sample_value("elastic_agent_step_time_ratio", {"job_id": "job", "node": metrics.node})
    assert value is not None
    return value


def test_in_a_lockstep_job_the_busy_time_tells_the_straggler():
    """Every node's wall time per step is the slowest one's; the work itself differs."""
    clock = StepClock(window=4)
    for step in range(6):
        clock.feed(step, 3.0 * step, busy=1.0)
    assert clock.figure() == pytest.approx(1.0)


def run_job(slow_factor: float, seconds: float, *, evict: bool = True) -> tuple[list[str], dict[str, AgentMetrics]]:
    """Three agents over one store; n0's steps take ``slow_factor`` times the others'."""
    clock, store, asked = FakeClock(), MemoryStore(reap_interval=None), []
    watches = {n: watch(store, clock, n, evict=evict, asked=asked if n == "n0" else []) for n in sorted(NODES)}
    t = 0.0
    while t < seconds:
        for node, (w, _) in watches.items():
            pace = slow_factor if node == "n0" else 1.0
            step = int(t / pace)
            w.compare([Progress(step, 0.0, step * pace)], NODES)
        clock.advance(0.25)
        t += 0.25
    return asked, {n: m for n, (_, m) in watches.items()}


def test_a_node_three_times_slower_is_reported_and_asked_to_leave():
    asked, metrics = run_job(3.0, 40.0)
    assert ratio_of(metrics["n0"]) == pytest.approx(3.0)
    assert ratio_of(metrics["n1"]) == pytest.approx(1.0)
    assert asked == ["straggler"]


def test_without_evict_the_straggler_is_only_reported():
    asked, metrics = run_job(3.0, 40.0, evict=False)
    assert ratio_of(metrics["n0"]) == pytest.approx(3.0) and asked == []


def test_a_node_a_little_slower_is_never_asked_to_leave():
    asked, metrics = run_job(1.5, 60.0)
    assert ratio_of(metrics["n0"]) == pytest.approx(1.5) and asked == []


def test_a_hostile_record_in_etcd_is_skipped():
    clock, store = FakeClock(), MemoryStore(reap_interval=None)
    w, _ = watch(store, clock, "n0")
    for key, value in [("n1", b"[[[["), ("n2", json.dumps({"s": "fast"}).encode()), ("bad id!", b'{"s": 1}'),
                       ("n3", b'{"s": 1}' + b" " * 300)]:
        store.put(w.prefix + key, value)
    store.put(w.prefix + "n4", b'{"s": 2.5}')
    kvs, _ = store.get_prefix(w.prefix)
    assert w._figures(kvs) == {"n4": 2.5}
