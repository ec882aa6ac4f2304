"""Prometheus metrics of one agent (prometheus-client, its own registry). They only record.

Naming follows Prometheus conventions: one prefix ``elastic_agent_``, base units, counters end
in ``_total``, metadata in an ``_info`` gauge, ratios 0-1, low-cardinality labels (job id,
node, reason, state, request type; never a pid or an attempt number). Every metric is
defined in docs/metrics.md.

The agent's loop drives everything through calls it makes anyway (``state``,
``rendezvous_done``, ``restart``, ``workers_started``, ``workers_stopped``, ``progress``,
``preemption``); goodput (agent.observe.goodput) and restart durations are derived from them.
What others know is handed in by whoever learnt it: ``nodes_alive`` (the loop's probe),
``etcd_request`` (an EtcdStore observer), ``restarts_used`` and ``job_others`` (the loop's
goodput sync with etcd), ``rebase`` (this node's earlier record). Series read at scrape time
live in agent.observe.collectors. Nothing here does I/O.

The scrape thread reads while the agent's loop writes: a lock guards the shared state.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from agent import __version__
from agent.common.progress import Progress
from agent.common.states import FINAL, State
from agent.observe.collectors import ETCD_REQUESTS, GoodputCollector, minus
from agent.observe.goodput import GoodputAccount, NodeReport, Totals
from rendezvous.errors import StoreFullError
from rendezvous.reasons import FAILURES, Reason
from rendezvous.state import Assignment

# ``*_created`` series double the exposition for nothing a dashboard uses.
disable_created_metrics()

# Every reason but the first round's: a label exported from the start, so rates work at once.
RESTART_REASONS = tuple(r for r in Reason if r != Reason.START)
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120, 300)
_ETCD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _Series:
    """Every series an agent exports, created in its registry, bound to (job id, node)."""

    def __init__(self, r: CollectorRegistry, lv: tuple[str, str], version: str, min_nodes: int,
                 max_nodes: int, max_restarts: int | None) -> None:
        labels = ("job_id", "node")

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        Gauge("elastic_agent_info", "Agent metadata (always 1).", labels + ("version",),
              registry=r).labels(*lv, version).set(1)
        self.state = Gauge("elastic_agent_state", "1 for the agent's current state, 0 for the others.",
                           labels + ("state",), registry=r)
        self.nodes = gauge("elastic_agent_world_size_nodes", "Nodes in the round this node last joined.").labels(*lv)
        self.workers = gauge("elastic_agent_world_size_workers",
                             "Workers (ranks) in the round this node last joined.").labels(*lv)
        gauge("elastic_agent_min_nodes", "Configured minimum number of nodes.").labels(*lv).set(min_nodes)
        gauge("elastic_agent_max_nodes", "Configured maximum number of nodes.").labels(*lv).set(max_nodes)
        gauge("elastic_agent_max_restarts", "Job-wide restart budget (worker failures); +Inf: unlimited."
              ).labels(*lv).set(math.inf if max_restarts is None else max_restarts)
        self.budget = gauge("elastic_agent_restart_budget_remaining",
                            "Job-wide restarts left before the job fails, as last read from etcd.")
        self.rank = gauge("elastic_agent_group_rank", "This node's group rank (-1 when not a member).").labels(*lv)
        self.round = gauge("elastic_agent_round", "Number of the rendezvous round this node last joined.").labels(*lv)
        self.alive = gauge("elastic_agent_nodes_alive",
                           "Nodes registered (alive) in etcd, as last probed during a long rendezvous.")
        self.running = gauge("elastic_agent_workers_running", "Local worker processes running.").labels(*lv)
        self.step = gauge("elastic_agent_last_step", "Last training step a local worker reported completing."
                          ).labels(*lv)
        self.step_ts = gauge("elastic_agent_last_step_timestamp_seconds",
                             "Unix time of the last reported training step.")
        self.notice = gauge("elastic_agent_preemption_notice",
                            "1 while this node is leaving on a preemption notice (SIGTERM/SIGINT or cloud)."
                            ).labels(*lv)
        self.rounds = Counter("elastic_agent_rendezvous_rounds", "Rendezvous rounds this node completed.",
                              labels, registry=r).labels(*lv)
        self.rdzv = Histogram("elastic_agent_rendezvous_duration_seconds",
                              "From entering the rendezvous to holding an assignment.", labels,
                              buckets=_DURATION_BUCKETS, registry=r).labels(*lv)
        self.restarts = Counter("elastic_agent_worker_group_restarts",
                                "Restarts of this node's worker group, by reason.", labels + ("reason",), registry=r)
        self.restart_dur = Histogram("elastic_agent_restart_duration_seconds",
                                     "From the decision to restart to the workers running again.", labels,
                                     buckets=_DURATION_BUCKETS, registry=r).labels(*lv)
        self.preempt = Counter("elastic_agent_preemption_notices",
                               "Leave requests received (SIGTERM/SIGINT or cloud notice).", labels,
                               registry=r).labels(*lv)
        self.etcd_dur = Histogram("elastic_agent_etcd_request_duration_seconds",
                                  "Latency of one etcd request attempt, by request type.",
                                  labels + ("request",), buckets=_ETCD_BUCKETS, registry=r)
        self.etcd_err = Counter("elastic_agent_etcd_errors", "Failed etcd request attempts, by request type.",
                                labels + ("request",), registry=r)
        self.out_of_space = gauge("elastic_agent_etcd_out_of_space",
                                  "1 while etcd refuses this agent's writes because it is out of space (NOSPACE)."
                                  ).labels(*lv)
        self.keepalive_fail = Counter("elastic_agent_etcd_lease_keepalive_failures",
                                      "Lease keep-alives that failed (etcd unreachable, slow, or lease gone).",
                                      labels, registry=r).labels(*lv)
        # Every label value exported from the start, so rates and dashboards work at once.
        for state in State:
            self.state.labels(*lv, state).set(0)
        self.state.labels(*lv, State.INITIALIZING).set(1)
        for reason in RESTART_REASONS:
            self.restarts.labels(*lv, reason)
        for kind in ETCD_REQUESTS:
            self.etcd_err.labels(*lv, kind)
        self.rank.set(-1)
        self.step.set(-1)


class AgentMetrics:
    def __init__(self, job_id: str, node: str, *, version: str = __version__,
                 min_nodes: int = 0, max_nodes: int = 0, max_restarts: int | None = 0,
                 registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.registry = registry or CollectorRegistry()
        self.job_id, self.node = job_id, node
        self.min_nodes, self.max_restarts = min_nodes, max_restarts
        self._clock, self._wall = clock, wall
        self._lock = threading.RLock()
        self.labels = self._lv = (job_id, node)
        self._s = _Series(self.registry, self._lv, version, min_nodes, max_nodes, max_restarts)
        self.current_state = State.INITIALIZING
        self.account = GoodputAccount()
        self.assignment: Assignment | None = None
        self.last_step: int | None = None
        self.last_step_time: float | None = None
        self._segment_step: int | None = None
        self._pending_restart: str | None = None
        self._restart_began: float | None = None
        self._job_others: Totals | None = None  # other nodes' totals, when this node loaded them
        self.registry.register(GoodputCollector(self._goodput, self._lv))

    # --- the agent's calls ------------------------------------------------------------------
    def state(self, state: State) -> None:
        with self._lock:
            now = self._clock()
            self._s.state.labels(*self._lv, self.current_state).set(0)
            self._s.state.labels(*self._lv, state).set(1)
            self.current_state = state
            self.account.state(state, now)
            if state == State.RUNNING and self._restart_began is not None:
                self._s.restart_dur.observe(max(0.0, now - self._restart_began))
                self._restart_began = None
            if state in FINAL:
                self._count_pending_restart(None)
                self._restart_began = None

    def rendezvous_done(self, seconds: float, assignment: Assignment, node: str) -> None:
        with self._lock:
            self._s.rdzv.observe(seconds)
            self._s.rounds.inc()
            self._count_pending_restart(assignment)
            self.assignment = assignment
            self._s.round.set(assignment.round)
            self._s.nodes.set(len(assignment.members))
            self._s.workers.set(assignment.world_size)
            rank = assignment.group_rank(node)
            self._s.rank.set(-1 if rank is None else rank)
            self.account.below_min(False, self._clock())

    def restart(self, reason: str) -> None:
        """The worker group is about to be restarted. Counted once the next round is known, so
        a worker failure caused by a lost node is counted as ``node_lost``."""
        with self._lock:
            self._count_pending_restart(None)
            self._pending_restart = reason if reason in RESTART_REASONS else Reason.WORKER_FAILURE
            if self._restart_began is None:
                self._restart_began = self._clock()

    def preemption(self) -> None:
        with self._lock:
            self._s.preempt.inc()
            self._s.notice.set(1)

    def workers_started(self, n: int) -> None:
        with self._lock:
            now = self._clock()
            self._s.running.set(n)
            self._segment_step = None
            self.account.workers_started(now)

    def workers_stopped(self) -> None:
        with self._lock:
            self._s.running.set(0)
            self.account.workers_stopped(self._clock())

    def progress(self, progress: Sequence[Progress | None]) -> None:
        reported = [p for p in progress if p is not None]
        with self._lock:
            now = self._clock()
            if reported:
                latest = max(reported, key=lambda p: (p.step, p.time))
                self.last_step, self.last_step_time = latest.step, latest.time
                self._s.step.set(latest.step)
                self._s.step_ts.labels(*self._lv).set(latest.time)
                # The group's step is the slowest local rank's: every rank completed it.
                group_step = min(p.step for p in reported) if len(reported) == len(progress) else None
                if group_step is not None and (self._segment_step is None or group_step > self._segment_step):
                    self._segment_step = group_step
                    self.account.step(group_step, now)

    # --- what others learnt -----------------------------------------------------------------
    def nodes_alive(self, alive: int) -> None:
        with self._lock:
            self._s.alive.labels(*self._lv).set(alive)
            self.account.below_min(alive < self.min_nodes, self._clock())

    def etcd_request(self, kind: str, seconds: float, error: BaseException | None = None) -> None:
        """EtcdStore observer: one request attempt of type ``kind`` took ``seconds``; ``error``
        is what it raised (None: it succeeded). Thread-safe (called from gRPC threads)."""
        kind = kind if kind in ETCD_REQUESTS else "other"
        if isinstance(error, StoreFullError):
            self._s.out_of_space.set(1)
        elif error is None and kind in ("put", "txn"):
            self._s.out_of_space.set(0)
        self._s.etcd_dur.labels(*self._lv, kind).observe(max(0.0, seconds))
        if error is not None:
            self._s.etcd_err.labels(*self._lv, kind).inc()
            if kind == "lease_keepalive":
                self._s.keepalive_fail.inc()

    def restarts_used(self, used: int) -> None:
        """The job-wide restart count, as read from etcd (``persist`` returns it)."""
        if self.max_restarts is None:
            self._s.budget.labels(*self._lv).set(math.inf)
        else:
            self._s.budget.labels(*self._lv).set(max(0, self.max_restarts - used))

    def job_others(self, totals: Totals) -> None:
        """The other nodes' goodput totals, as this node last read them from etcd."""
        with self._lock:
            self._job_others = totals

    def rebase(self, earlier: NodeReport) -> None:
        """Continue this node's goodput totals from its record of an earlier agent run."""
        with self._lock:
            self.account.rebase(earlier.totals)

    def node_report(self, checkpoint: tuple[int, float] | None = None) -> NodeReport:
        """This node's record for etcd (``checkpoint``: the latest complete one, step and time)."""
        step, saved = checkpoint if checkpoint is not None else (None, None)
        with self._lock:
            return NodeReport(
                node_id=self.node, totals=self.account.totals(self._clock()), state=self.current_state,
                last_step=self.last_step, last_step_time=self.last_step_time,
                checkpoint_step=step, checkpoint_time=saved, max_restarts=self.max_restarts, time=self._wall(),
            )

    @property
    def is_job_reporter(self) -> bool:
        """The group-rank-0 node reads every node's record for the job-wide ratio."""
        with self._lock:
            return self.assignment is not None and self.assignment.group_rank(self.node) == 0

    # --- internals ----------------------------------------------------------------------------
    def _count_pending_restart(self, assignment: Assignment | None) -> None:
        reason = self._pending_restart
        if reason is None:
            return
        self._pending_restart = None
        # A restart the job's own workers caused, when the next round lacks a member of the
        # previous one, was that node's loss (its peers' collectives broke), as the budget sees it.
        if assignment is not None and reason in FAILURES and self.assignment is not None:
            if set(self.assignment.node_ids) - set(assignment.node_ids):
                reason = Reason.NODE_LOST
        self._s.restarts.labels(*self._lv, reason).inc()

    def _goodput(self) -> tuple[Totals, Totals, Totals | None]:
        """(since this agent started, across its restarts, other nodes' or None), for a scrape."""
        with self._lock:
            mine = self.account.totals(self._clock())
            return minus(mine, self.account.base), mine, self._job_others
