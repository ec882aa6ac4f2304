"""The loop's etcd chores for observability: this node's goodput record (read back at start;
written when the agent's state changed, at most every ``SYNC_ON_CHANGE`` seconds, otherwise
every ``SYNC_EVERY`` seconds, and at exit) and, in a long rendezvous, how many nodes are
alive. Errors are logged, never raised: bookkeeping must not stop an agent. The metrics
object only records what these calls learn.

Why so rarely: every write is a new revision that etcd keeps until it compacts. A record of
~0.4 KB every 10 s from 1,024 nodes was ~4 GB of history a day, past etcd's default 2 GB
quota within a day; every 60 s it is ~0.6 GB, which etcd's auto-compaction (on in the
embedded etcd and in every manifest we ship, see docs/operations.md) keeps bounded."""

from __future__ import annotations

import logging

from agent.observe import goodput
from agent.observe.collectors import CheckpointCollector
from agent.observe.metrics import AgentMetrics
from rendezvous.clock import Clock
from rendezvous.errors import RendezvousError
from rendezvous.settings import Settings
from rendezvous.store import Store

log = logging.getLogger("elastic_agent")

SYNC_EVERY = 60.0  # seconds between writes of this node's goodput record while nothing changes
SYNC_ON_CHANGE = 5.0  # a state change is written this soon, at the earliest
ALIVE_PROBE_GRACE = 2.0  # a rendezvous shorter than this never asks etcd how many nodes are alive
ALIVE_PROBE_INTERVAL = 5.0


class Bookkeeping:
    def __init__(self, store: Store, settings: Settings, node_id: str, metrics: AgentMetrics,
                 checkpoints: CheckpointCollector, clock: Clock) -> None:
        self.store, self.settings, self.node_id = store, settings, node_id
        self.metrics, self.checkpoints, self.clock = metrics, checkpoints, clock
        self._synced_at: float | None = None
        self._synced_state = ""
        self._rendezvous_since: float | None = None
        self._probed_at: float | None = None

    def resume(self) -> None:
        """Continue this node's goodput from its record of an earlier agent run."""
        try:
            earlier = goodput.resume(self.store, self.settings, self.node_id)
        except RendezvousError as exc:
            log.warning("could not read this node's goodput record (%s); starting from zero", exc)
            return
        if earlier is not None:
            self.metrics.rebase(earlier)
            self.checkpoints.seed(earlier.checkpoint_step, earlier.checkpoint_time)

    def tick(self) -> None:
        """Called on every pass of the loop: sync when due, probe when due."""
        now = self.clock.monotonic()
        since = None if self._synced_at is None else now - self._synced_at
        changed = self.metrics.current_state != self._synced_state
        if since is None or since >= SYNC_EVERY or (changed and since >= SYNC_ON_CHANGE):
            self.sync()
        self._probe_alive(now)

    def sync(self) -> None:
        self._synced_at = self.clock.monotonic()
        self._synced_state = self.metrics.current_state
        report = self.metrics.node_report(self.checkpoints.latest())
        try:
            used, others = goodput.sync(self.store, self.settings, report, job_wide=self.metrics.is_job_reporter)
        except RendezvousError as exc:
            log.warning("could not sync goodput totals with etcd (%s); will retry", exc)
            return
        self.metrics.restarts_used(used)
        if others is not None:
            self.metrics.job_others(others)

    def rendezvous(self, entered: bool) -> None:
        """The loop entered (True) or left (False) a rendezvous."""
        self._rendezvous_since = self.clock.monotonic() if entered else None
        self._probed_at = None

    def _probe_alive(self, now: float) -> None:
        """In a long rendezvous, ask etcd now and then how many nodes are alive (one count
        request), so waiting below min nodes is told apart from an ordinary rendezvous."""
        since = self._rendezvous_since
        if since is None or now - since < ALIVE_PROBE_GRACE:
            return
        if self._probed_at is not None and now - self._probed_at < ALIVE_PROBE_INTERVAL:
            return
        self._probed_at = now
        try:
            self.metrics.nodes_alive(self.store.count_prefix(self.settings.nodes_prefix))
        except RendezvousError as exc:
            log.debug("alive-nodes probe failed: %s", exc)
