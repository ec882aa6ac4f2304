"""AgentMetrics exposition: a fresh registry per test, a fake clock, exact values compared.

The agent's loop is played as calls (the same calls agent/daemon/loop.py makes); what a scrape
returns is read with prometheus_client's own parser, or compared as exact exposition lines.
"""

from __future__ import annotations

import math

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.daemon.policy import Progress
from agent.observe import goodput
from agent.observe.collectors import CheckpointCollector, RequestCountCollector
from agent.observe.goodput import NodeReport, Totals, goodput_key, persist
from agent.observe.metrics import AgentMetrics
from agent.worker import checkpoint
from rendezvous.memory_store import MemoryStore
from rendezvous.settings import Settings
from rendezvous.state import Assignment, Member, RestartCount
from rendezvous.store import RequestCounter

WALL = 1_700_000_000.0
SETTINGS = Settings(job_id="job", min_nodes=2, max_nodes=3, max_restarts=3)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def make(**kw: object) -> tuple[AgentMetrics, Clock]:
    clock = Clock()
    m = AgentMetrics("job", "n0", min_nodes=2, max_nodes=3, max_restarts=3, clock=clock,  # type: ignore[arg-type]
                     wall=lambda: WALL, **kw)
    return m, clock


def text(m: AgentMetrics) -> str:
    return generate_latest(m.registry).decode()


def samples(m: AgentMetrics) -> dict[str, float]:
    """``name{label="v",...}`` (labels sorted, job_id and node left out) -> value."""
    out = {}
    for family in text_string_to_metric_families(text(m)):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k not in ("job_id", "node")}
            key = s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
            out[key] = s.value
    return out


def assignment(n: int, *nodes: str, nproc: int = 2) -> Assignment:
    return Assignment(n, tuple(Member(x, "127.0.0.1", nproc) for x in nodes), "127.0.0.1", 29500)


def run_round(m: AgentMetrics, clock: Clock, a: Assignment, rdzv: float = 1.0) -> None:
    m.state("rendezvous")
    clock.advance(rdzv)
    m.rendezvous_done(rdzv, a, "n0")
    m.workers_started(2)
    m.state("running")


def test_fresh_exposition_exact_lines() -> None:
    m, _ = make()
    lines = text(m).splitlines()
    for expected in [
        '# TYPE elastic_agent_info gauge',
        'elastic_agent_info{job_id="job",node="n0",version="0.1.0"} 1.0',
        'elastic_agent_state{job_id="job",node="n0",state="initializing"} 1.0',
        'elastic_agent_state{job_id="job",node="n0",state="running"} 0.0',
        'elastic_agent_min_nodes{job_id="job",node="n0"} 2.0',
        'elastic_agent_max_nodes{job_id="job",node="n0"} 3.0',
        'elastic_agent_max_restarts{job_id="job",node="n0"} 3.0',
        'elastic_agent_group_rank{job_id="job",node="n0"} -1.0',
        'elastic_agent_last_step{job_id="job",node="n0"} -1.0',
        '# TYPE elastic_agent_worker_group_restarts_total counter',
        'elastic_agent_worker_group_restarts_total{job_id="job",node="n0",reason="node_lost"} 0.0',
        'elastic_agent_elapsed_seconds_total{job_id="job",node="n0"} 0.0',
        'elastic_agent_badput_seconds_total{job_id="job",node="n0",reason="below_min_nodes"} 0.0',
        'elastic_agent_goodput_ratio{job_id="job",node="n0"} 0.0',
    ]:
        assert expected in lines, expected
    assert not any("_created" in line for line in lines)
    # Job-wide series only once known; no restart budget before etcd was read.
    assert "elastic_agent_job_goodput_ratio{" not in text(m)
    assert "elastic_agent_restart_budget_remaining{" not in text(m)


def test_round_world_size_rank_and_state() -> None:
    m, clock = make()
    run_round(m, clock, assignment(4, "n1", "n0", "n2"))
    s = samples(m)
    assert s["elastic_agent_round"] == 4
    assert s["elastic_agent_world_size_nodes"] == 3
    assert s["elastic_agent_world_size_workers"] == 6
    assert s["elastic_agent_group_rank"] == 1
    assert s["elastic_agent_rendezvous_rounds_total"] == 1
    assert s['elastic_agent_rendezvous_duration_seconds_bucket{le="1.0"}'] == 1
    assert s['elastic_agent_rendezvous_duration_seconds_bucket{le="0.5"}'] == 0
    assert s['elastic_agent_state{state="running"}'] == 1
    assert sum(v for k, v in s.items() if k.startswith("elastic_agent_state{")) == 1
    assert s["elastic_agent_workers_running"] == 2


@pytest.mark.parametrize(
    ("reason", "next_members", "counted"),
    [
        ("worker_failure", ("n0", "n1", "n2"), "worker_failure"),  # everyone back: the workers' own fault
        ("worker_failure", ("n0", "n2"), "node_lost"),             # a member missing: its loss broke our collectives
        ("hang", ("n0", "n2"), "node_lost"),
        ("node_left", ("n0", "n2"), "node_left"),
        ("scale_up", ("n0", "n1", "n2", "n3"), "scale_up"),
        ("lease_lost", ("n0", "n1", "n2"), "lease_lost"),
        ("nonsense", ("n0", "n1", "n2"), "worker_failure"),
    ],
)
def test_restart_reason_is_settled_by_the_next_round(reason: str, next_members: tuple[str, ...], counted: str) -> None:
    m, clock = make()
    run_round(m, clock, assignment(1, "n0", "n1", "n2"))
    clock.advance(10)
    m.restart(reason)
    m.state("restarting")
    assert samples(m)[f'elastic_agent_worker_group_restarts_total{{reason="{counted}"}}'] == 0  # not yet
    clock.advance(0.5)
    m.workers_stopped()
    run_round(m, clock, assignment(2, *next_members), rdzv=2.0)
    s = samples(m)
    restarts = {k: v for k, v in s.items() if k.startswith("elastic_agent_worker_group_restarts_total")}
    assert restarts.pop(f'elastic_agent_worker_group_restarts_total{{reason="{counted}"}}') == 1
    assert set(restarts.values()) == {0}
    # From the decision to restart to the workers running again: 0.5 s stopping + 2 s rendezvous.
    assert s["elastic_agent_restart_duration_seconds_count"] == 1
    assert s["elastic_agent_restart_duration_seconds_sum"] == pytest.approx(2.5)


def test_a_restart_pending_when_the_job_ends_is_counted_as_reported() -> None:
    m, clock = make()
    run_round(m, clock, assignment(1, "n0", "n1"))
    m.restart("worker_failure")
    m.state("failed")
    assert samples(m)['elastic_agent_worker_group_restarts_total{reason="worker_failure"}'] == 1


def test_progress_steps_and_goodput_counters() -> None:
    m, clock = make()
    run_round(m, clock, assignment(1, "n0", "n1"), rdzv=2.0)
    clock.advance(3)
    m.progress([Progress(0, WALL + 1), None])  # one rank reported: the group has not finished a step
    assert samples(m)["elastic_agent_last_step"] == 0
    m.progress([Progress(1, WALL + 2), Progress(0, WALL + 1.5)])  # group step 0 ends startup
    clock.advance(2)
    m.progress([Progress(2, WALL + 4), Progress(2, WALL + 4)])
    s = samples(m)
    assert s["elastic_agent_last_step"] == 2
    assert s["elastic_agent_last_step_timestamp_seconds"] == WALL + 4
    assert s["elastic_agent_elapsed_seconds_total"] == 7
    assert s["elastic_agent_productive_seconds_total"] == 2
    assert s['elastic_agent_badput_seconds_total{reason="rendezvous"}'] == 2
    assert s['elastic_agent_badput_seconds_total{reason="startup"}'] == 3
    assert s["elastic_agent_goodput_ratio"] == pytest.approx(2 / 7)


def test_checkpoint_step_and_time_are_read_at_scrape_time_at_most_every_few_seconds(tmp_path) -> None:
    m, clock = make()
    m.registry.register(CheckpointCollector(tmp_path, m.labels, clock=clock))
    assert samples(m)["elastic_agent_last_checkpoint_step"] == -1  # nothing yet
    checkpoint.save(tmp_path, 5, {"x": b"1"}, round_number=1, now=lambda: WALL - 60)
    clock.advance(6)
    s = samples(m)
    assert (s["elastic_agent_last_checkpoint_step"], s["elastic_agent_last_checkpoint_timestamp_seconds"]) == (5, WALL - 60)
    checkpoint.save(tmp_path, 10, {"x": b"2"}, round_number=1, now=lambda: WALL)
    clock.advance(1)
    assert samples(m)["elastic_agent_last_checkpoint_step"] == 5  # scanned 1 s ago: not again yet
    clock.advance(5)
    assert samples(m)["elastic_agent_last_checkpoint_step"] == 10


def test_a_hung_checkpoint_directory_never_blocks_a_scrape(tmp_path, monkeypatch) -> None:
    import threading
    import time

    from agent.worker import checkpoint as ckpt_module

    release = threading.Event()

    def hung(*_args, **_kw):
        release.wait(10)
        return []

    monkeypatch.setattr(ckpt_module, "complete_checkpoints", hung)
    m, clock = make()
    collector = CheckpointCollector(tmp_path, m.labels, clock=clock)
    collector.seed(7, WALL)  # what an earlier agent run saw
    m.registry.register(collector)
    began = time.monotonic()
    assert samples(m)["elastic_agent_last_checkpoint_step"] == 7
    assert time.monotonic() - began < 2
    release.set()


def test_preemption_notice() -> None:
    m, _ = make()
    m.preemption()
    s = samples(m)
    assert (s["elastic_agent_preemption_notice"], s["elastic_agent_preemption_notices_total"]) == (1, 1)


def test_etcd_observer_and_request_counter() -> None:
    m, _ = make()
    counter = RequestCounter()
    counter.add("range", 3)
    counter.add("txn")
    m.registry.register(RequestCountCollector(counter, m.labels))
    m.etcd_request("range", 0.004)
    m.etcd_request("txn", 0.2, error=RuntimeError("UNAVAILABLE"))
    m.etcd_request("lease_keepalive", 2.0, error=RuntimeError("deadline"))
    m.etcd_request("something_new", 0.001)
    s = samples(m)
    assert s['elastic_agent_etcd_requests_total{request="range"}'] == 3
    assert s['elastic_agent_etcd_requests_total{request="txn"}'] == 1
    assert s['elastic_agent_etcd_requests_total{request="put"}'] == 0
    assert s['elastic_agent_etcd_errors_total{request="txn"}'] == 1
    assert s['elastic_agent_etcd_errors_total{request="range"}'] == 0
    assert s["elastic_agent_etcd_lease_keepalive_failures_total"] == 1
    assert s['elastic_agent_etcd_request_duration_seconds_bucket{le="0.005",request="range"}'] == 1
    assert s['elastic_agent_etcd_request_duration_seconds_count{request="other"}'] == 1


def test_nodes_alive_below_min_counts_as_its_own_badput() -> None:
    m, clock = make()
    m.state("rendezvous")
    clock.advance(2.5)
    m.nodes_alive(1)  # the loop's probe found fewer than min (2) nodes
    clock.advance(11)
    s = samples(m)
    assert s["elastic_agent_nodes_alive"] == 1
    assert s['elastic_agent_badput_seconds_total{reason="below_min_nodes"}'] == 11
    assert s['elastic_agent_badput_seconds_total{reason="rendezvous"}'] == 2.5


def sync(m: AgentMetrics, store: MemoryStore) -> None:
    """What the loop does every ~10 s: write this node's record, feed back what etcd said."""
    used, others = goodput.sync(store, SETTINGS, m.node_report(), job_wide=m.is_job_reporter)
    m.restarts_used(used)
    if others is not None:
        m.job_others(others)


def test_sync_writes_the_record_reads_the_budget_and_rank0_exports_the_job_ratio() -> None:
    store = MemoryStore(reap_interval=None)
    persist(store, SETTINGS, "n1", NodeReport("n1", Totals(elapsed=10, productive=10)))
    store.put(SETTINGS.restarts_key, RestartCount(1, "worker_failure: x").encode())
    m, clock = make()
    run_round(m, clock, assignment(1, "n0", "n1"), rdzv=10.0)
    sync(m, store)
    kv, _ = store.get(goodput_key(SETTINGS, "n0"))
    assert kv is not None
    mine = NodeReport.decode(kv.key, kv.value)
    assert (mine.totals.elapsed, mine.state, mine.max_restarts, mine.time) == (10, "running", 3, WALL)
    s = samples(m)
    assert s["elastic_agent_restart_budget_remaining"] == 2
    assert s["elastic_agent_job_goodput_ratio"] == pytest.approx(10 / 20)


def test_sync_on_another_rank_does_not_read_every_record() -> None:
    store = MemoryStore(reap_interval=None)
    m, clock = make()
    run_round(m, clock, assignment(1, "n1", "n0"))
    sync(m, store)
    assert "elastic_agent_job_goodput_ratio{" not in text(m)


def test_resume_continues_this_nodes_ratio_but_counters_start_at_zero() -> None:
    store = MemoryStore(reap_interval=None)
    earlier = NodeReport("n0", Totals(elapsed=90, productive=90, highest_step=40), checkpoint_step=30,
                         checkpoint_time=WALL - 5)
    persist(store, SETTINGS, "n0", earlier)
    m, clock = make()
    resumed = goodput.resume(store, SETTINGS, "n0")
    assert resumed is not None
    m.rebase(resumed)
    run_round(m, clock, assignment(1, "n0", "n1"), rdzv=10.0)
    s = samples(m)
    assert s["elastic_agent_elapsed_seconds_total"] == 10  # a counter restarts with its process
    assert s["elastic_agent_goodput_ratio"] == pytest.approx(90 / 100)
    report = m.node_report((resumed.checkpoint_step, resumed.checkpoint_time))
    assert (report.totals.elapsed, report.totals.highest_step, report.checkpoint_step) == (100, 40, 30)


def test_unlimited_budget_is_infinite() -> None:
    m = AgentMetrics("job", "n0", max_restarts=None)
    m.restarts_used(7)
    s = samples(m)
    assert math.isinf(s["elastic_agent_max_restarts"]) and math.isinf(s["elastic_agent_restart_budget_remaining"])


def test_snapshots_off_is_read_from_the_workers_signal_file_at_scrape_time(tmp_path) -> None:
    from prometheus_client import CollectorRegistry

    from agent.observe.collectors import SnapshotsOffCollector
    from agent.worker.protocol import OFF_FILE

    registry = CollectorRegistry()
    registry.register(SnapshotsOffCollector(lambda: tmp_path / OFF_FILE, ("job", "n1")))
    line = 'elastic_agent_snapshots_off{job_id="job",node="n1"} '
    assert line + "0.0" in generate_latest(registry).decode()
    (tmp_path / OFF_FILE).write_text('{"v": 1, "why": "no room"}')  # what a worker writes when /dev/shm is short
    assert line + "1.0" in generate_latest(registry).decode()
