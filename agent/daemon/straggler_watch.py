"""The agent's straggler chores: publish this node's step time, read the others', export the
comparison as metrics and, with ``--straggler-evict``, ask this node to leave (the planned
leave a SIGTERM starts: the workers stop at an announced step boundary, no step is lost).

Cost, whatever the job's size: every ``interval`` seconds (at most 10) one put of a ~40-byte
record on this node's session lease (``<root>steptime/<node-id>``: it vanishes with the node)
and one range read of that prefix. Errors are logged, never raised: like bookkeeping, this
must not stop an agent. The decisions are agent.observe.stragglers'.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence

from prometheus_client import Gauge

from agent.daemon.config.layers import AgentConfig
from agent.daemon.policy import Progress
from agent.daemon.signals import Signals
from agent.daemon.workers.local import Running
from agent.observe import stragglers
from agent.observe.metrics import AgentMetrics
from rendezvous.clock import Clock
from rendezvous.errors import RendezvousError
from rendezvous.participant import Participant
from rendezvous.settings import Settings, valid_id
from rendezvous.store import Store

log = logging.getLogger("elastic_agent")

MAX_INTERVAL = 10.0
MIN_INTERVAL = 1.0
RECORD_LIMIT = 256  # bytes: a larger record is not one of ours


def interval_for(window: float) -> float:
    """How often figures are exchanged: four comparisons per eviction window, 1-10 s."""
    return min(MAX_INTERVAL, max(MIN_INTERVAL, window / 4))


def group_step(progress: Sequence[Progress | None]) -> tuple[int | None, float | None, float | None]:
    """The step every local rank completed, when the last of them reported it (host monotonic
    time) and the longest busy time among them (None unless every one of them reported one);
    (None, None, None) until every rank reported a step."""
    if not progress or any(p is None or p.mono is None for p in progress):
        return None, None, None
    ranks = [p for p in progress if p is not None]
    step = min(p.step for p in ranks)
    at = [p for p in ranks if p.step == step]
    busy = [p.busy for p in at]
    return (step, max(p.mono for p in at if p.mono is not None),
            max(b for b in busy if b is not None) if all(b is not None for b in busy) else None)


class _Gauges:
    def __init__(self, metrics: AgentMetrics) -> None:
        labels, r = ("job_id", "node"), metrics.registry
        self.mine = Gauge("elastic_agent_step_seconds", "Seconds per training step of this node's workers, "
                          "over their last steps (NaN until known).", labels, registry=r).labels(*metrics.labels)
        self.median = Gauge("elastic_agent_job_median_step_seconds", "Median seconds per step of the "
                            "round's nodes (NaN with fewer than 3 figures).", labels, registry=r).labels(*metrics.labels)
        self.ratio = Gauge("elastic_agent_step_time_ratio", "This node's step time over the job's median: "
                           "1 is typical, 3 a node three times slower (NaN when unknown).", labels,
                           registry=r).labels(*metrics.labels)
        for g in (self.mine, self.median, self.ratio):
            g.set(float("nan"))


class StragglerWatch:
    def __init__(self, store: Store, settings: Settings, node_id: str, metrics: AgentMetrics, clock: Clock,
                 lease: Callable[[], int], *, evict: bool, factor: float, window: float,
                 leave: Callable[[str], None]) -> None:
        self.store, self.settings, self.node_id, self.clock = store, settings, node_id, clock
        self.lease, self.evict, self.leave = lease, evict, leave
        self.interval = interval_for(window)
        self.steps = stragglers.StepClock()
        self.verdict = stragglers.Verdict(factor, window)
        self.gauges = _Gauges(metrics)
        self._due: float | None = None
        self._asked = False
        self._run: tuple[float, int] | None = None

    @classmethod
    def of(cls, config: AgentConfig, store: Store, metrics: AgentMetrics, clock: Clock, participant: Participant,
           signals: Signals) -> StragglerWatch:
        """The agent's watch: records on its session's lease, a leave asked for as a cloud notice is."""
        def lease() -> int:
            session = participant.session
            return session.lease if session is not None else 0

        return cls(store, participant.settings, config.node_id, metrics, clock, lease, evict=config.straggler_evict,
                   factor=config.straggler_factor, window=config.straggler_window, leave=signals.request)

    @property
    def prefix(self) -> str:
        return f"{self.settings.root}steptime/"

    def tick(self, progress: Sequence[Progress | None], run: Running) -> None:
        """Called on every look at the workers of ``run`` (the round's running workers)."""
        started = (run.started_at, run.assignment.round)
        if started != self._run:  # new or re-formed workers: their first steps are start-up, not pace
            self._run = started
            self.steps.reset()
            self.verdict.reset()
        self.compare(progress, frozenset(run.assignment.node_ids))

    def compare(self, progress: Sequence[Progress | None], members: frozenset[str]) -> None:
        self.steps.feed(*group_step(progress))
        now = self.clock.monotonic()
        if self._due is not None and now < self._due:
            return
        self._due = now + self.interval
        mine = self.steps.figure()
        self.gauges.mine.set(float("nan") if mine is None else mine)
        try:
            if mine is not None:
                self.store.put(self.prefix + self.node_id, json.dumps({"s": round(mine, 6)}).encode(), self.lease())
            kvs, _ = self.store.get_prefix(self.prefix)
        except RendezvousError as exc:
            log.debug("step-time exchange failed: %s", exc)
            return
        seen = stragglers.compare(mine, self._figures(kvs), self.node_id, members)
        self.gauges.median.set(float("nan") if seen is None else seen.median)
        self.gauges.ratio.set(float("nan") if seen is None else seen.ratio)
        if self.verdict.observe(seen, now) and self.evict and not self._asked and seen is not None:
            self._asked = True
            log.warning("this node's steps took %.2fx the job's median (%.3fs against %.3fs over %d nodes) "
                        "for %.0fs: leaving as a straggler (--straggler-evict)", seen.ratio, seen.mine,
                        seen.median, seen.nodes, self.verdict.window)
            self.leave("straggler")

    def _figures(self, kvs: list) -> dict[str, float]:
        """Every well-formed figure under the prefix, by node id; anything else is skipped."""
        out: dict[str, float] = {}
        for kv in kvs:
            node = kv.key[len(self.prefix):]
            if not valid_id(node) or len(kv.value) > RECORD_LIMIT:
                continue
            try:
                data = json.loads(kv.value)
            except (ValueError, RecursionError):
                continue
            figure = stragglers.valid_figure(data.get("s")) if isinstance(data, dict) else None
            if figure is not None:
                out[node] = figure
        return out
