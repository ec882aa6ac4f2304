"""Series computed when Prometheus scrapes (prometheus ``client_python``'s custom collectors):
goodput from the agent's account, etcd request counts from the store's counter, and the
latest complete checkpoint from the checkpoint directory. Each takes what it reads as a
parameter and reads it in ``collect()``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.observe.goodput import BADPUT_REASONS, Totals
from rendezvous.store import RequestCounter

log = logging.getLogger(__name__)

LABELS = ["job_id", "node"]
ETCD_REQUESTS = ("range", "put", "txn", "delete", "lease_grant", "lease_keepalive", "lease_revoke",
                 "watch_create", "watch_cancel")
CHECKPOINT_SCAN_INTERVAL = 5.0  # a scrape storm reads the checkpoint directory at most this often
CHECKPOINT_SCAN_WAIT = 0.5  # a scrape waits this long for a scan; a hung filesystem never blocks it


def minus(a: Totals, b: Totals) -> Totals:
    return Totals(
        elapsed=max(0.0, a.elapsed - b.elapsed), productive=max(0.0, a.productive - b.productive),
        badput={r: max(0.0, a.badput[r] - b.badput.get(r, 0.0)) for r in BADPUT_REASONS},
        highest_step=a.highest_step,
    )


class _Collector:
    def describe(self) -> list[Metric]:
        return []  # computed per scrape; no names reserved up front


class GoodputCollector(_Collector):
    """``source()`` -> (this agent process's totals, this node's across agent restarts, the
    other nodes' totals when this node is the job's reporter, else None)."""

    def __init__(self, source: Callable[[], tuple[Totals, Totals, Totals | None]], labels: tuple[str, str]):
        self._source = source
        self._lv = list(labels)

    def collect(self) -> Iterator[Metric]:
        live, mine, others = self._source()
        lv = self._lv
        c = CounterMetricFamily("elastic_agent_elapsed_seconds",
                                "Wall time since this agent's first rendezvous (this agent process).", labels=LABELS)
        c.add_metric(lv, live.elapsed)
        yield c
        c = CounterMetricFamily("elastic_agent_productive_seconds",
                                "Time spent completing new training steps (this agent process).", labels=LABELS)
        c.add_metric(lv, live.productive)
        yield c
        c = CounterMetricFamily("elastic_agent_badput_seconds",
                                "Time not spent on new training steps, by reason (this agent process).",
                                labels=LABELS + ["reason"])
        for reason in BADPUT_REASONS:
            c.add_metric(lv + [reason], live.badput[reason])
        yield c
        g = GaugeMetricFamily("elastic_agent_goodput_ratio",
                              "This node's productive / elapsed seconds since it first joined the job (0-1), "
                              "across agent restarts.", labels=LABELS)
        g.add_metric(lv, mine.ratio)
        yield g
        if others is not None:
            g = GaugeMetricFamily("elastic_agent_job_goodput_ratio",
                                  "The job's productive / elapsed node-seconds over every node (0-1), "
                                  "exported by the group-rank-0 node.", labels=LABELS)
            g.add_metric(lv, others.plus(mine).ratio)
            yield g


class RequestCountCollector(_Collector):
    """A store's :class:`RequestCounter` as ``elastic_agent_etcd_requests_total{request}``."""

    def __init__(self, counter: RequestCounter, labels: tuple[str, str]) -> None:
        self._counter = counter
        self._lv = list(labels)

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily("elastic_agent_etcd_requests", "etcd requests sent, by request type.",
                                labels=LABELS + ["request"])
        counts = self._counter.snapshot()
        for kind in sorted(set(ETCD_REQUESTS) | set(counts)):
            c.add_metric(self._lv + [kind], counts.get(kind, 0))
        yield c


class CheckpointCollector(_Collector):
    """The latest complete checkpoint in ``directory`` (step and save time), read at scrape
    time. A scan runs on its own thread and a scrape waits for it only briefly, so a hung
    network filesystem shows the last values instead of blocking ``/metrics``."""

    def __init__(self, directory: Path | None, labels: tuple[str, str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self._lv = list(labels)
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: tuple[int, float] | None = None
        self._scanned_at: float | None = None
        self._scan: threading.Thread | None = None

    def seed(self, step: int | None, saved: float | None) -> None:
        """What an earlier agent run last saw, until a scan finds something."""
        with self._lock:
            if self._latest is None and step is not None:
                self._latest = (step, saved or 0.0)

    def latest(self) -> tuple[int, float] | None:
        """(step, unix time saved) of the latest complete checkpoint, as last scanned."""
        with self._lock:
            return self._latest

    def refresh(self, wait: float = CHECKPOINT_SCAN_WAIT) -> None:
        """Start a scan unless one ran recently or is still running; wait up to ``wait``."""
        if self.directory is None:
            return
        with self._lock:
            now = self._clock()
            busy = self._scan is not None and self._scan.is_alive()
            recent = self._scanned_at is not None and now - self._scanned_at < CHECKPOINT_SCAN_INTERVAL
            if busy or recent:
                scan = self._scan if busy else None
            else:
                self._scanned_at = now
                scan = self._scan = threading.Thread(target=self._run, daemon=True, name="checkpoint-scan")
                scan.start()
        if scan is not None:
            scan.join(wait)

    def _run(self) -> None:
        from agent.worker.checkpoint import complete_checkpoints  # noqa: PLC0415

        assert self.directory is not None
        try:
            found = complete_checkpoints(self.directory, check_hashes=False)
        except OSError as exc:
            log.debug("cannot scan %s: %s", self.directory, exc)
            return
        if found:
            with self._lock:
                self._latest = (found[-1].step, found[-1].time)

    def collect(self) -> Iterator[Metric]:
        self.refresh()
        latest = self.latest()
        step = GaugeMetricFamily("elastic_agent_last_checkpoint_step", "Step of the latest complete checkpoint.",
                                 labels=LABELS)
        step.add_metric(self._lv, -1 if latest is None else latest[0])
        yield step
        if latest is not None:
            saved = GaugeMetricFamily("elastic_agent_last_checkpoint_timestamp_seconds",
                                      "Unix time the latest complete checkpoint was saved.", labels=LABELS)
            saved.add_metric(self._lv, latest[1])
            yield saved


class SnapshotsOffCollector(_Collector):
    """``elastic_agent_snapshots_off``: 1 when this node's workers turned in-memory snapshots
    off (``/dev/shm`` cannot hold them: ``agent.worker.snapshot`` writes why into ``.off`` in
    the node's snapshot directory), else 0. Read at scrape time: one stat of a local file."""

    def __init__(self, off_file: Callable[[], Path], labels: tuple[str, str]) -> None:
        self._off_file = off_file
        self._lv = list(labels)

    def collect(self) -> Iterator[Metric]:
        try:
            off = self._off_file().is_file()
        except OSError:
            off = False
        g = GaugeMetricFamily("elastic_agent_snapshots_off",
                              "1 when this node's in-memory snapshots are off (no room in /dev/shm), else 0.",
                              labels=LABELS)
        g.add_metric(self._lv, 1.0 if off else 0.0)
        yield g
