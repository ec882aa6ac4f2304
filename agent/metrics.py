"""Prometheus metrics of one agent (prometheus-client, its own registry).

Naming follows Prometheus conventions: one prefix ``elastic_agent_``, base units, counters end
in ``_total``, metadata in an ``_info`` gauge, ratios 0-1, low-cardinality labels (job id,
node, reason, state, request type; never a pid or an attempt number). Every metric is
defined in docs/metrics.md.

The agent drives everything through a handful of calls it makes anyway (``state``,
``rendezvous_done``, ``restart``, ``workers_started``, ``workers_stopped``, ``progress``,
``preemption``); goodput (agent.goodput) and restart durations are derived from them.
Optional hooks: ``rendezvous_tick`` (below-min-nodes detection), ``etcd_request`` (an
EtcdStore observer), ``track_requests`` (the store's request counter), ``sync``/``resume``
(goodput totals in etcd).

The scrape thread reads while the agent's loop writes: a lock guards the shared state, and
nothing here blocks on I/O except ``sync``/``resume`` (called by the loop) and the rate-limited
checkpoint directory scan.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent import goodput
from agent.goodput import BADPUT_REASONS, GoodputAccount, NodeReport, Totals
from agent.policy import Progress
from rendezvous.state import Assignment

log = logging.getLogger(__name__)

# ``*_created`` series double the exposition for nothing a dashboard uses.
disable_created_metrics()

STATES = ("initializing", "rendezvous", "running", "restarting", "stopping", "succeeded", "failed", "stopped")
FINAL_STATES = frozenset({"succeeded", "failed", "stopped"})
RESTART_REASONS = ("worker_failure", "node_lost", "node_left", "scale_up", "hang", "lease_lost", "preemption")
# Restarts the job's own workers caused; when the next round lacks a member of the previous
# one, the failure was that node's loss (its peers' collectives broke), as the budget sees it.
_FAILURE_REASONS = frozenset({"worker_failure", "hang"})
ETCD_REQUESTS = ("range", "put", "txn", "delete", "lease_grant", "lease_keepalive", "lease_revoke",
                 "watch_create", "watch_cancel")
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60, 120, 300)
_ETCD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
CHECKPOINT_SCAN_INTERVAL = 5.0  # seconds between scans of the checkpoint directory
ALIVE_PROBE_GRACE = 2.0  # a rendezvous shorter than this never probes how many nodes are alive
ALIVE_PROBE_INTERVAL = 5.0


class AgentMetrics:
    def __init__(self, job_id: str, node: str, *, version: str = "0.1.0",
                 min_nodes: int = 0, max_nodes: int = 0, max_restarts: int | None = 0,
                 checkpoint_dir: str | Path | None = None,
                 alive_nodes: Callable[[], int] | None = None,
                 registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.registry = registry or CollectorRegistry()
        self.job_id, self.node = job_id, node
        self.min_nodes, self.max_restarts = min_nodes, max_restarts
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.alive_nodes = alive_nodes  # e.g. lambda: store.count_prefix(settings.nodes_prefix)
        self._clock, self._wall = clock, wall
        self._lock = threading.RLock()
        r = self.registry
        labels = ("job_id", "node")
        lv = self._lv = (job_id, node)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels + extra, registry=r)

        gauge("elastic_agent_info", "Agent metadata (always 1).", ("version",)).labels(*lv, version).set(1)
        self._state = gauge("elastic_agent_state", "1 for the agent's current state, 0 for the others.", ("state",))
        self._nodes = gauge("elastic_agent_world_size_nodes", "Nodes in the round this node last joined.")
        self._workers = gauge("elastic_agent_world_size_workers", "Workers (ranks) in the round this node last joined.")
        gauge("elastic_agent_min_nodes", "Configured minimum number of nodes.").labels(*lv).set(min_nodes)
        gauge("elastic_agent_max_nodes", "Configured maximum number of nodes.").labels(*lv).set(max_nodes)
        gauge("elastic_agent_max_restarts", "Job-wide restart budget (worker failures); +Inf: unlimited."
              ).labels(*lv).set(math.inf if max_restarts is None else max_restarts)
        self._budget = gauge("elastic_agent_restart_budget_remaining",
                             "Job-wide restarts left before the job fails, as last read from etcd.")
        self._rank = gauge("elastic_agent_group_rank", "This node's group rank (-1 when not a member).")
        self._round = gauge("elastic_agent_round", "Number of the rendezvous round this node last joined.")
        self._alive = gauge("elastic_agent_nodes_alive",
                            "Nodes registered (alive) in etcd, as last probed during a long rendezvous.")
        self._running = gauge("elastic_agent_workers_running", "Local worker processes running.")
        self._step = gauge("elastic_agent_last_step", "Last training step a local worker reported completing.")
        self._step_ts = gauge("elastic_agent_last_step_timestamp_seconds",
                              "Unix time of the last reported training step.")
        self._ckpt = gauge("elastic_agent_last_checkpoint_step", "Step of the latest complete checkpoint.")
        self._ckpt_ts = gauge("elastic_agent_last_checkpoint_timestamp_seconds",
                              "Unix time the latest complete checkpoint was saved.")
        self._notice = gauge("elastic_agent_preemption_notice",
                             "1 while this node is leaving on a preemption notice (SIGTERM/SIGINT or cloud).")
        self._rounds = Counter("elastic_agent_rendezvous_rounds", "Rendezvous rounds this node completed.",
                               labels, registry=r)
        self._rdzv = Histogram("elastic_agent_rendezvous_duration_seconds",
                               "From entering the rendezvous to holding an assignment.", labels,
                               buckets=_DURATION_BUCKETS, registry=r)
        self._restarts = Counter("elastic_agent_worker_group_restarts",
                                 "Restarts of this node's worker group, by reason.",
                                 labels + ("reason",), registry=r)
        self._restart_dur = Histogram("elastic_agent_restart_duration_seconds",
                                      "From the decision to restart to the workers running again.", labels,
                                      buckets=_DURATION_BUCKETS, registry=r)
        self._preempt = Counter("elastic_agent_preemption_notices",
                                "Leave requests received (SIGTERM/SIGINT or cloud notice).", labels, registry=r)
        self._etcd_dur = Histogram("elastic_agent_etcd_request_duration_seconds",
                                   "Latency of one etcd request attempt, by request type.",
                                   labels + ("request",), buckets=_ETCD_BUCKETS, registry=r)
        self._etcd_err = Counter("elastic_agent_etcd_errors", "Failed etcd request attempts, by request type.",
                                 labels + ("request",), registry=r)
        self._keepalive_fail = Counter("elastic_agent_etcd_lease_keepalive_failures",
                                       "Lease keep-alives that failed (etcd unreachable, slow, or lease gone).",
                                       labels, registry=r)

        for state in STATES:
            self._state.labels(*lv, state).set(0)
        self._state.labels(*lv, "initializing").set(1)
        for reason in RESTART_REASONS:
            self._restarts.labels(*lv, reason)
        for kind in ETCD_REQUESTS:
            self._etcd_err.labels(*lv, kind)
        for g in (self._nodes, self._workers, self._round, self._running, self._notice, self._rounds,
                  self._keepalive_fail, self._preempt):
            g.labels(*lv)
        self._rank.labels(*lv).set(-1)
        self._step.labels(*lv).set(-1)
        self._ckpt.labels(*lv).set(-1)
        self._rdzv.labels(*lv)
        self._restart_dur.labels(*lv)

        self.current_state = "initializing"
        self.workers_running = 0
        self.account = GoodputAccount()
        self.assignment: Assignment | None = None
        self.last_step: int | None = None
        self.last_step_time: float | None = None
        self.checkpoint_step: int | None = None
        self.checkpoint_time: float | None = None
        self._segment_step: int | None = None
        self._pending_restart: str | None = None
        self._restart_began: float | None = None
        self._rdzv_entered: float | None = None
        self._probed_at: float | None = None
        self._ckpt_scanned_at: float | None = None
        self._job_others: Totals | None = None  # other nodes' totals, when this node loaded them
        self._request_counter = None
        r.register(_Derived(self))

    # --- the agent's calls ------------------------------------------------------------------
    def state(self, state: str) -> None:
        with self._lock:
            now = self._clock()
            self._state.labels(*self._lv, self.current_state).set(0)
            self._state.labels(*self._lv, state).set(1)
            self.current_state = state
            self.account.state(state, now)
            if state == "rendezvous":
                self._rdzv_entered = now
                self._probed_at = None
            elif state == "running" and self._restart_began is not None:
                self._restart_dur.labels(*self._lv).observe(max(0.0, now - self._restart_began))
                self._restart_began = None
            if state in FINAL_STATES:
                self._count_pending_restart(None)
                self._restart_began = None

    def rendezvous_done(self, seconds: float, assignment: Assignment, node: str) -> None:
        with self._lock:
            self._rdzv.labels(*self._lv).observe(seconds)
            self._rounds.labels(*self._lv).inc()
            self._count_pending_restart(assignment)
            self.assignment = assignment
            self._round.labels(*self._lv).set(assignment.round)
            self._nodes.labels(*self._lv).set(len(assignment.members))
            self._workers.labels(*self._lv).set(assignment.world_size)
            rank = assignment.group_rank(node)
            self._rank.labels(*self._lv).set(-1 if rank is None else rank)
            self.account.below_min(False, self._clock())

    def restart(self, reason: str) -> None:
        """The worker group is about to be restarted. Counted once the next round is known, so
        a worker failure caused by a lost node is counted as ``node_lost``."""
        with self._lock:
            self._count_pending_restart(None)
            self._pending_restart = reason if reason in RESTART_REASONS else "worker_failure"
            if self._restart_began is None:
                self._restart_began = self._clock()

    def preemption(self) -> None:
        with self._lock:
            self._preempt.labels(*self._lv).inc()
            self._notice.labels(*self._lv).set(1)

    def workers_started(self, n: int) -> None:
        with self._lock:
            now = self._clock()
            self.workers_running = n
            self._running.labels(*self._lv).set(n)
            self._segment_step = None
            self.account.workers_started(now)
            self._scan_checkpoints(now, force=True)

    def workers_stopped(self) -> None:
        with self._lock:
            self.workers_running = 0
            self._running.labels(*self._lv).set(0)
            self.account.workers_stopped(self._clock())

    def progress(self, progress: Sequence[Progress | None]) -> None:
        reported = [p for p in progress if p is not None]
        with self._lock:
            now = self._clock()
            if reported:
                latest = max(reported, key=lambda p: (p.step, p.time))
                self.last_step, self.last_step_time = latest.step, latest.time
                self._step.labels(*self._lv).set(latest.step)
                self._step_ts.labels(*self._lv).set(latest.time)
                # The group's step is the slowest local rank's: every rank completed it.
                group_step = min(p.step for p in reported) if len(reported) == len(progress) else None
                if group_step is not None and (self._segment_step is None or group_step > self._segment_step):
                    self._segment_step = group_step
                    self.account.step(group_step, now)
            self._scan_checkpoints(now)

    # --- optional hooks -----------------------------------------------------------------------
    def rendezvous_tick(self) -> None:
        """Called from the rendezvous wait's tick. After ``ALIVE_PROBE_GRACE`` seconds in a
        rendezvous, asks ``alive_nodes`` (one count request) every ``ALIVE_PROBE_INTERVAL``
        seconds, so waiting below min nodes is told apart from an ordinary rendezvous."""
        probe = self.alive_nodes
        with self._lock:
            now = self._clock()
            if probe is None or self.current_state != "rendezvous" or self._rdzv_entered is None:
                return
            if now - self._rdzv_entered < ALIVE_PROBE_GRACE:
                return
            if self._probed_at is not None and now - self._probed_at < ALIVE_PROBE_INTERVAL:
                return
            self._probed_at = now
        try:
            alive = int(probe())
        except Exception as exc:  # noqa: BLE001 - a metrics probe must never break the rendezvous
            log.debug("alive-nodes probe failed: %s", exc)
            return
        self.nodes_alive(alive)

    def nodes_alive(self, alive: int) -> None:
        with self._lock:
            self._alive.labels(*self._lv).set(alive)
            self.account.below_min(alive < self.min_nodes, self._clock())

    def etcd_request(self, kind: str, seconds: float, error: BaseException | None = None) -> None:
        """EtcdStore observer: one request attempt of type ``kind`` took ``seconds``; ``error``
        is what it raised (None: it succeeded). Thread-safe (called from gRPC threads)."""
        kind = kind if kind in ETCD_REQUESTS else "other"
        self._etcd_dur.labels(*self._lv, kind).observe(max(0.0, seconds))
        if error is not None:
            self._etcd_err.labels(*self._lv, kind).inc()
            if kind == "lease_keepalive":
                self._keepalive_fail.labels(*self._lv).inc()

    def track_requests(self, counter: object) -> None:
        """Export a store's ``RequestCounter`` (``store.requests``) as
        ``elastic_agent_etcd_requests_total{request}``."""
        self._request_counter = counter

    def restarts_used(self, used: int) -> None:
        """The job-wide restart count, as read from etcd (``persist`` returns it)."""
        if self.max_restarts is None:
            self._budget.labels(*self._lv).set(math.inf)
        else:
            self._budget.labels(*self._lv).set(max(0, self.max_restarts - used))

    # --- goodput totals in etcd ---------------------------------------------------------------
    def node_report(self) -> NodeReport:
        with self._lock:
            return NodeReport(
                node_id=self.node, totals=self.account.totals(self._clock()), state=self.current_state,
                last_step=self.last_step, last_step_time=self.last_step_time,
                checkpoint_step=self.checkpoint_step, checkpoint_time=self.checkpoint_time,
                max_restarts=self.max_restarts, time=self._wall(),
            )

    def resume(self, store: object, settings: object) -> None:
        """At start: continue this node's totals from its record in etcd (one read). Errors
        are logged, never raised: metrics must not stop an agent."""
        from rendezvous.errors import RendezvousError  # noqa: PLC0415

        key = goodput.goodput_key(settings, self.node)  # type: ignore[arg-type]
        try:
            kv, _ = store.get(key)  # type: ignore[attr-defined]
            if kv is None:
                return
            report = NodeReport.decode(kv.key, kv.value)
        except RendezvousError as exc:
            log.warning("could not read this node's goodput record (%s); starting from zero", exc)
            return
        with self._lock:
            self.account.rebase(report.totals)
            if report.checkpoint_step is not None and self.checkpoint_step is None:
                self.checkpoint_step, self.checkpoint_time = report.checkpoint_step, report.checkpoint_time

    def sync(self, store: object, settings: object, *, job_wide: bool | None = None) -> None:
        """Write this node's record and read the job's restart count (one transaction); on the
        group-rank-0 node (or with ``job_wide=True``) also read every node's record for the
        job-wide goodput ratio. Call every ~10 s from the loop and once at exit."""
        from rendezvous.errors import RendezvousError  # noqa: PLC0415

        report = self.node_report()
        if job_wide is None:
            with self._lock:
                job_wide = self.assignment is not None and self.assignment.group_rank(self.node) == 0
        try:
            used = goodput.persist(store, settings, self.node, report)  # type: ignore[arg-type]
            self.restarts_used(used)
            if job_wide:
                reports = goodput.load(store, settings)  # type: ignore[arg-type]
                reports.pop(self.node, None)
                with self._lock:
                    self._job_others = goodput.job_totals(reports)
        except RendezvousError as exc:
            log.warning("could not sync goodput totals with etcd (%s); will retry", exc)

    # --- internals ----------------------------------------------------------------------------
    def _count_pending_restart(self, assignment: Assignment | None) -> None:
        reason = self._pending_restart
        if reason is None:
            return
        self._pending_restart = None
        if assignment is not None and reason in _FAILURE_REASONS and self.assignment is not None:
            if set(self.assignment.node_ids) - set(assignment.node_ids):
                reason = "node_lost"
        self._restarts.labels(*self._lv, reason).inc()

    def _scan_checkpoints(self, now: float, force: bool = False) -> None:
        if self.checkpoint_dir is None:
            return
        if not force and self._ckpt_scanned_at is not None and now - self._ckpt_scanned_at < CHECKPOINT_SCAN_INTERVAL:
            return
        self._ckpt_scanned_at = now
        from agent.checkpoint import complete_checkpoints  # noqa: PLC0415

        try:
            found = complete_checkpoints(self.checkpoint_dir, check_hashes=False)
        except OSError as exc:
            log.debug("cannot scan %s: %s", self.checkpoint_dir, exc)
            return
        if found:
            latest = found[-1]
            self.checkpoint_step, self.checkpoint_time = latest.step, latest.time
        if self.checkpoint_step is not None:
            self._ckpt.labels(*self._lv).set(self.checkpoint_step)
            self._ckpt_ts.labels(*self._lv).set(self.checkpoint_time or 0.0)

    def _collect(self) -> Iterator[Metric]:
        with self._lock:
            now = self._clock()
            mine = self.account.totals(now)
            live = _minus(mine, self.account.base)
            others = self._job_others
            counter = self._request_counter
        labels = ["job_id", "node"]
        lv = list(self._lv)
        c = CounterMetricFamily("elastic_agent_elapsed_seconds",
                                "Wall time since this agent's first rendezvous (this agent process).", labels=labels)
        c.add_metric(lv, live.elapsed)
        yield c
        c = CounterMetricFamily("elastic_agent_productive_seconds",
                                "Time spent completing new training steps (this agent process).", labels=labels)
        c.add_metric(lv, live.productive)
        yield c
        c = CounterMetricFamily("elastic_agent_badput_seconds",
                                "Time not spent on new training steps, by reason (this agent process).",
                                labels=labels + ["reason"])
        for reason in BADPUT_REASONS:
            c.add_metric(lv + [reason], live.badput[reason])
        yield c
        g = GaugeMetricFamily("elastic_agent_goodput_ratio",
                              "This node's productive / elapsed seconds since it first joined the job (0-1), "
                              "across agent restarts.", labels=labels)
        g.add_metric(lv, mine.ratio)
        yield g
        if others is not None:
            g = GaugeMetricFamily("elastic_agent_job_goodput_ratio",
                                  "The job's productive / elapsed node-seconds over every node (0-1), "
                                  "exported by the group-rank-0 node.", labels=labels)
            g.add_metric(lv, others.plus(mine).ratio)
            yield g
        if counter is not None:
            c = CounterMetricFamily("elastic_agent_etcd_requests", "etcd requests sent, by request type.",
                                    labels=labels + ["request"])
            counts = counter.snapshot()  # type: ignore[attr-defined]
            for kind in sorted(set(ETCD_REQUESTS) | set(counts)):
                c.add_metric(lv + [kind], counts.get(kind, 0))
            yield c


def _minus(a: Totals, b: Totals) -> Totals:
    return Totals(
        elapsed=max(0.0, a.elapsed - b.elapsed), productive=max(0.0, a.productive - b.productive),
        badput={r: max(0.0, a.badput[r] - b.badput.get(r, 0.0)) for r in BADPUT_REASONS},
        highest_step=a.highest_step,
    )


class _Derived:
    """Series computed at scrape time (goodput, request counts)."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics._collect()

    def describe(self) -> list[Metric]:
        return []  # computed per scrape; no names reserved up front
