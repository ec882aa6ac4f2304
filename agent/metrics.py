"""Prometheus metrics of one agent (prometheus-client, its own registry).

Naming follows Prometheus conventions: one prefix ``elastic_agent_``, base units, counters end
in ``_total``, metadata in an ``_info`` gauge, low-cardinality labels (job id, node, reason;
never a pid or an attempt number). Definitions: docs/metrics.md.
"""

from __future__ import annotations

from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent.policy import Progress
from rendezvous.state import Assignment

STATES = ("initializing", "rendezvous", "running", "restarting", "stopping", "succeeded", "failed", "stopped")
RESTART_REASONS = ("worker_failure", "node_lost", "node_left", "scale_up", "hang", "lease_lost", "preemption")
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120, 300)


class AgentMetrics:
    def __init__(self, job_id: str, node: str, *, version: str = "0.1.0",
                 min_nodes: int = 0, max_nodes: int = 0, max_restarts: int = 0,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = ("job_id", "node")
        self._lv = (job_id, node)
        Gauge("elastic_agent_info", "Agent metadata (always 1).", labels + ("version",), registry=r
              ).labels(*self._lv, version).set(1)
        self._state = Gauge("elastic_agent_state", "1 for the agent's current state, 0 otherwise.",
                            labels + ("state",), registry=r)
        self._nodes = Gauge("elastic_agent_world_size_nodes", "Nodes in the current round.", labels, registry=r)
        self._workers = Gauge("elastic_agent_world_size_workers", "Workers (ranks) in the current round.",
                              labels, registry=r)
        g = Gauge("elastic_agent_min_nodes", "Configured minimum number of nodes.", labels, registry=r)
        g.labels(*self._lv).set(min_nodes)
        g = Gauge("elastic_agent_max_nodes", "Configured maximum number of nodes.", labels, registry=r)
        g.labels(*self._lv).set(max_nodes)
        g = Gauge("elastic_agent_max_restarts", "Job-wide restart budget (worker failures).", labels, registry=r)
        g.labels(*self._lv).set(max_restarts)
        self._rank = Gauge("elastic_agent_group_rank", "This node's group rank (-1 when not a member).",
                           labels, registry=r)
        self._round = Gauge("elastic_agent_round", "Number of the rendezvous round this node runs in.",
                            labels, registry=r)
        self._rounds = Counter("elastic_agent_rendezvous_rounds", "Rendezvous rounds this node completed.",
                               labels, registry=r)
        self._rdzv = Histogram("elastic_agent_rendezvous_duration_seconds",
                               "From entering the rendezvous to holding an assignment.", labels,
                               buckets=_DURATION_BUCKETS, registry=r)
        self._restarts = Counter("elastic_agent_restarts", "Worker-group restarts on this node, by reason.",
                                 labels + ("reason",), registry=r)
        self._running = Gauge("elastic_agent_workers_running", "Local worker processes running.", labels, registry=r)
        self._step = Gauge("elastic_agent_last_step", "Last training step reported by a local worker.",
                           labels, registry=r)
        self._step_ts = Gauge("elastic_agent_last_step_timestamp_seconds",
                              "Unix time of the last reported training step.", labels, registry=r)
        self._preempt = Counter("elastic_agent_preemptions", "Leave requests (SIGTERM/SIGINT or cloud notice).",
                                labels, registry=r)
        for state in STATES:
            self._state.labels(*self._lv, state).set(0)
        for reason in RESTART_REASONS:
            self._restarts.labels(*self._lv, reason)
        self._rank.labels(*self._lv).set(-1)
        self.current_state = "initializing"
        self.workers_running = 0

    def state(self, state: str) -> None:
        self._state.labels(*self._lv, self.current_state).set(0)
        self._state.labels(*self._lv, state).set(1)
        self.current_state = state

    def rendezvous_done(self, seconds: float, assignment: Assignment, node: str) -> None:
        self._rdzv.labels(*self._lv).observe(seconds)
        self._rounds.labels(*self._lv).inc()
        self._round.labels(*self._lv).set(assignment.round)
        self._nodes.labels(*self._lv).set(len(assignment.members))
        self._workers.labels(*self._lv).set(assignment.world_size)
        rank = assignment.group_rank(node)
        self._rank.labels(*self._lv).set(-1 if rank is None else rank)

    def restart(self, reason: str) -> None:
        self._restarts.labels(*self._lv, reason if reason in RESTART_REASONS else "worker_failure").inc()

    def preemption(self) -> None:
        self._preempt.labels(*self._lv).inc()

    def workers_started(self, n: int) -> None:
        self.workers_running = n
        self._running.labels(*self._lv).set(n)

    def workers_stopped(self) -> None:
        self.workers_running = 0
        self._running.labels(*self._lv).set(0)

    def progress(self, progress: Sequence[Progress | None]) -> None:
        reported = [p for p in progress if p is not None]
        if reported:
            latest = max(reported, key=lambda p: (p.step, p.time))
            self._step.labels(*self._lv).set(latest.step)
            self._step_ts.labels(*self._lv).set(latest.time)
