"""The agent's one loop: rendezvous, run the local workers, watch, restart, finish.

States: initializing -> rendezvous -> running -> (restarting -> rendezvous ...) ->
succeeded | failed | stopped. Signal handlers and watch callbacks only record; this loop acts.
Decisions that need no I/O (what a worker exit means, who is hung) live in agent.policy.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import policy
from agent.config import AgentConfig
from agent.env import resolve_nproc, worker_env
from agent.errors import EXIT_FAILED, EXIT_PREEMPTED, EXIT_SUCCEEDED, AgentError
from agent.metrics import AgentMetrics
from agent.protocol import CONTROL_FILE_ENV, DRAIN
from agent.spawner import WarmWorker, WorkerGroup, error_file_path, prewarmable
from rendezvous.errors import (
    JobFinishedError,
    LeaseLostError,
    RendezvousError,
    StoreUnavailableError,
)
from rendezvous.participant import Notice, Participant
from rendezvous.settings import Settings
from rendezvous.state import SUCCEEDED, Assignment, NodeRecord
from rendezvous.store import Store

log = logging.getLogger("elastic_agent")

VERSION = "0.1.0"
REJOIN_TIMEOUT = 600.0  # after being fenced, how long to keep trying to reach etcd again
GOODPUT_SYNC_INTERVAL = 10.0  # how often this node's goodput record is written to etcd
DRAIN_MARGIN = 5.0  # of a preemption notice's time, kept for stopping workers and leaving
PREWARM_DELAY = 2.0  # workers run this long before the next ones are pre-started (spare the CPU)


class _Leave(Exception):
    """Raised from a rendezvous wait when this node was asked to leave."""


@dataclass
class _Running:
    """The local worker group of one round."""

    assignment: Assignment
    group: WorkerGroup
    attempt_dir: Path
    progress_files: list[Path]
    control_file: Path
    started_at: float
    started_wall: float
    draining_since: float | None = None
    drain_budget: float = 0.0


class Signals:
    """Handlers only record; the loop reads. A first SIGTERM/SIGINT (or a cloud preemption
    notice) asks for a graceful leave; a second one stops the workers regardless."""

    def __init__(self) -> None:
        self.count = 0
        self.deadline: float | None = None  # monotonic time the node will be terminated, if known
        self.source = "signal"

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.count += 1

    def request(self, source: str, deadline: float | None = None) -> None:
        """A leave asked for by something other than a signal (a cloud preemption notice)."""
        self.source = source
        self.deadline = deadline
        self.count = max(self.count, 1)


class Agent:
    def __init__(self, config: AgentConfig, store: Store, *, metrics: AgentMetrics | None = None,
                 signals: Signals | None = None, environ: dict[str, str] | None = None) -> None:
        self.config = config
        self.store = store
        self.environ = dict(os.environ if environ is None else environ)
        self.nproc = resolve_nproc(config.nproc_per_node, self.environ)
        self.signals = signals or Signals()
        self.metrics = metrics or AgentMetrics(config.job_id, config.node_id)
        self.settings = Settings(
            job_id=config.job_id, min_nodes=config.min_nodes, max_nodes=config.max_nodes,
            lease_ttl=config.lease_ttl, last_call=config.last_call,
            scale_up_cooldown=config.scale_up_cooldown, max_restarts=config.max_restarts,
        )
        self.participant = Participant(
            store, self.settings,
            NodeRecord(config.node_id, config.node_addr, self.nproc, host=os.uname().nodename,
                       version=VERSION),
        )
        self.metrics.alive_nodes = lambda: self.store.count_prefix(self.settings.nodes_prefix)
        self._next_sync = 0.0
        self.attempt = 0
        self.running: _Running | None = None
        self.prewarm = config.prewarm and prewarmable(config.command)
        self.warm: list[WarmWorker] = []
        self.state = "initializing"
        self.heartbeat = time.monotonic()

    # --- the loop ------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.config
        self._set_state("initializing")
        try:
            self.participant.start()
        except JobFinishedError as exc:
            return self._already_finished(exc)
        self.metrics.resume(self.store, self.settings)
        self._fill_warm()  # the first workers import torch while the rendezvous runs
        log.info("node %s joined job %s (min %d, max %d nodes, %d workers per node)",
                 cfg.node_id, cfg.job_id, cfg.min_nodes, cfg.max_nodes, self.nproc)
        try:
            return self._loop()
        finally:
            self._stop_workers("agent exiting", drain=False)
            for warm in self.warm:
                warm.discard()
            self.warm.clear()
            self.metrics.sync(self.store, self.settings)
            self.participant.close()

    def _loop(self) -> int:
        while True:
            self._set_state("rendezvous")
            try:
                assignment = self._rendezvous()
            except _Leave:
                return self._leave("asked to leave during rendezvous")
            except JobFinishedError as exc:
                return self._finished(exc.outcome, exc.reason)
            except LeaseLostError as exc:
                self._fenced(str(exc))
                continue
            self._finish_stopping()
            self._start_workers(assignment)
            self._set_state("running")
            outcome = self._supervise()
            if outcome is not None:
                return outcome

    def _rendezvous(self) -> Assignment:
        started = time.monotonic()
        assignment = self.participant.next_assignment(on_tick=self._tick)
        self.metrics.rendezvous_done(time.monotonic() - started, assignment, self.config.node_id)
        log.info("round %d: %d nodes, world size %d; this node is group rank %s; master %s:%d",
                 assignment.round, len(assignment.members), assignment.world_size,
                 assignment.group_rank(self.config.node_id), assignment.master_addr,
                 assignment.master_port)
        return assignment

    def _tick(self) -> None:
        """Called by the rendezvous at least every half second: stay live, advance a stop
        in progress, and honour a leave request."""
        self.heartbeat = time.monotonic()
        self.metrics.rendezvous_tick()
        self._maybe_sync()
        self._advance_stop()
        if self.signals.count:
            raise _Leave()

    def _maybe_sync(self) -> None:
        now = time.monotonic()
        if now >= self._next_sync:
            self._next_sync = now + GOODPUT_SYNC_INTERVAL
            self.metrics.sync(self.store, self.settings)

    def _supervise(self) -> int | None:
        """Watch the workers and the job until the round ends. Returns an exit code when the
        agent should exit, None when it should re-enter the rendezvous."""
        run = self.running
        assert run is not None
        done_reported = False
        while True:
            self.heartbeat = time.monotonic()
            self._maybe_sync()
            if time.monotonic() - run.started_at >= PREWARM_DELAY:
                self._fill_warm()
            if self.signals.count:
                return self._leave(f"asked to leave ({self.signals.source})")
            session = self.participant.session
            if session is not None and session.lost.is_set():  # fence now, whatever poll is doing
                self._fenced(session.lost_reason)
                return None
            notice = self.participant.poll(self.config.monitor_interval)
            if notice is not None:
                return self._on_notice(notice)
            codes = run.group.poll()
            verdict = policy.judge_exits(codes)
            progress = policy.read_progress(run.progress_files)
            self.metrics.progress(progress)
            if verdict.failed:
                rank = verdict.failed[0]
                summary = run.group.failure_summary(rank)
                log.error("worker failed: %s", summary)
                for line in run.group.stderr_tail(rank, lines=5):
                    log.error("  [%s/%d] %s", self.config.node_id, rank, line)
                self._restart(f"worker_failure: {self.config.node_id} {summary}", "worker_failure")
                return None
            if self.config.hang_timeout > 0:
                silent = policy.silent_ranks(progress, codes, self.config.hang_timeout, time.time(),
                                             run.started_wall)
                if silent:
                    ranks = ", ".join(str(r) for r in silent)
                    log.error("hang: local ranks %s reported no progress for %.0fs", ranks,
                              self.config.hang_timeout)
                    self._restart(f"hang: {self.config.node_id} local ranks {ranks} silent for "
                                  f"{self.config.hang_timeout:.0f}s", "hang")
                    return None
            if verdict.all_succeeded and not done_reported:
                done_reported = True
                log.info("all %d local workers exited 0; waiting for the other nodes", len(codes))
                try:
                    self.participant.report_done()
                except StoreUnavailableError as exc:
                    log.warning("could not report completion yet (%s); retrying", exc)
                    done_reported = False

    def _on_notice(self, notice: Notice) -> int | None:
        if notice.kind == "finished":
            assert notice.status is not None
            return self._finished(notice.status.outcome, notice.status.reason)
        if notice.kind == "lease_lost":
            self._fenced(notice.detail)
            return None
        assert notice.round is not None
        kind = policy.reason_kind(notice.round.reason)
        log.info("round %d opened (%s): restarting the local workers", notice.round.number, notice.round.reason)
        self.metrics.restart(kind)
        self._set_state("restarting")
        # A planned change (a node joining) lets the workers finish their step and checkpoint.
        self._begin_stop(notice.round.reason, drain=kind == "scale_up")
        return None

    def _restart(self, reason: str, kind: str) -> None:
        reason = reason if len(reason) <= 400 else reason[:397] + "..."  # it is stored in etcd
        self.metrics.restart(kind)
        self._set_state("restarting")
        self.participant.request_new_round(reason)  # first, so the other nodes react at once
        self._begin_stop(reason, drain=False)

    # --- outcomes ------------------------------------------------------------------------
    def _finished(self, outcome: str, reason: str) -> int:
        self._stop_workers(f"job {outcome}", drain=False)
        if outcome == SUCCEEDED:
            self._set_state("succeeded")
            log.info("job %s succeeded: %s", self.config.job_id, reason)
            return EXIT_SUCCEEDED
        self._set_state("failed")
        log.error("job %s failed: %s", self.config.job_id, reason)
        return EXIT_FAILED

    def _already_finished(self, exc: JobFinishedError) -> int:
        if exc.outcome == SUCCEEDED:
            log.info("job %s already succeeded (%s); nothing to do", self.config.job_id, exc.reason)
            self._set_state("succeeded")
            return EXIT_SUCCEEDED
        log.error("job %s already failed (%s); nothing to do", self.config.job_id, exc.reason)
        self._set_state("failed")
        return EXIT_FAILED

    def _leave(self, why: str) -> int:
        """Graceful leave: drain the workers (every rank of the job checkpoints at the same
        step), open the next round at once, revoke our lease, exit 3."""
        self._set_state("stopping")
        self.metrics.preemption()
        log.warning("leaving job %s: %s", self.config.job_id, why)
        run = self.running
        if run is not None:
            self._begin_stop(why, drain=True)
            self._finish_stopping()
        self.participant.leave(reason="preempted")
        self._set_state("stopped")
        log.warning("left job %s cleanly", self.config.job_id)
        return EXIT_PREEMPTED

    def _fenced(self, why: str) -> None:
        """Our lease is gone: others may already run a newer round without us, so our workers
        must stop now (fencing), then we rejoin when etcd answers."""
        log.error("lost our lease (%s): stopping local workers at once", why)
        self.metrics.restart("lease_lost")
        self._stop_workers("lease lost", drain=False)
        deadline = time.monotonic() + REJOIN_TIMEOUT
        while True:
            try:
                self.participant.rejoin()
                log.info("re-registered with etcd after losing the lease")
                return
            except RendezvousError as exc:
                if isinstance(exc, JobFinishedError):
                    raise
                if time.monotonic() >= deadline:
                    raise AgentError(f"etcd unreachable for {REJOIN_TIMEOUT:.0f}s after losing our lease: {exc}") from exc
                log.warning("cannot rejoin yet (%s); retrying", exc)
                self.heartbeat = time.monotonic()
                if self.signals.count:
                    raise _Leave() from exc
                time.sleep(1.0)

    # --- workers -------------------------------------------------------------------------
    def _start_workers(self, assignment: Assignment) -> None:
        cfg = self.config
        node = cfg.node_id
        attempt_dir = cfg.log_dir / cfg.job_id / f"attempt_{self.attempt}"
        self.attempt += 1
        if attempt_dir.exists():
            shutil.rmtree(attempt_dir, ignore_errors=True)
        attempt_dir.mkdir(parents=True, exist_ok=True)
        group_rank = assignment.group_rank(node)
        assert group_rank is not None
        offset = assignment.rank_offset(node)
        control = attempt_dir / "control"
        progress = [attempt_dir / str(r) / "progress.json" for r in range(self.nproc)]
        envs = []
        for local_rank in range(self.nproc):
            env = worker_env(
                self.environ, local_rank=local_rank, local_world_size=self.nproc,
                group_rank=group_rank, group_world_size=len(assignment.members),
                rank_offset=offset, world_size=assignment.world_size,
                master_addr=assignment.master_addr, master_port=assignment.master_port,
                restart_count=self.attempt - 1, max_restarts=cfg.max_restarts, run_id=cfg.job_id,
                error_file=str(error_file_path(attempt_dir, local_rank)), node_id=node,
                round_number=assignment.round,
                checkpoint_dir=str(cfg.checkpoint_dir) if cfg.checkpoint_dir else None,
                progress_file=str(progress[local_rank]),
            )
            env[CONTROL_FILE_ENV] = str(control)
            envs.append(env)
        prefixes = [f"{node}/{offset + r}" for r in range(self.nproc)]
        warm, self.warm = self.warm[: self.nproc], self.warm[self.nproc:]
        group = WorkerGroup(cfg.command, envs, attempt_dir, prefixes, warm=warm)
        group.start()
        self.running = _Running(assignment, group, attempt_dir, progress, control, time.monotonic(), time.time())
        self.metrics.workers_started(self.nproc)
        log.info("started %d workers (global ranks %d-%d, pids %s), logs in %s", self.nproc, offset,
                 offset + self.nproc - 1, ",".join(map(str, group.pids)), attempt_dir)

    def _fill_warm(self) -> None:
        """Keep one pre-started worker per local rank ready for the next round."""
        if not self.prewarm:
            return
        self.warm = [w for w in self.warm if w.alive()]
        env = {**self.environ, "OMP_NUM_THREADS": self.environ.get("OMP_NUM_THREADS", "1")}
        while len(self.warm) < self.nproc:
            try:
                self.warm.append(WarmWorker(self.config.command[0], env))
            except AgentError as exc:
                log.warning("cannot pre-start workers (%s); starting them cold", exc)
                self.prewarm = False
                return

    def _begin_stop(self, why: str, drain: bool) -> None:
        run = self.running
        if run is None or run.draining_since is not None:
            return
        if drain and policy.helper_in_use(run.progress_files) and any(c is None for c in run.group.poll()):
            budget = self.config.drain_timeout
            if self.signals.deadline is not None:  # leave time to stop and revoke before termination
                budget = max(0.0, min(budget, self.signals.deadline - time.monotonic() - DRAIN_MARGIN))
            log.info("asking workers to checkpoint and stop at the next step within %.0fs (%s)", budget, why)
            tmp = run.control_file.with_suffix(".tmp")
            tmp.write_text(DRAIN)
            os.replace(tmp, run.control_file)  # workers never see a half-written request
            run.draining_since = time.monotonic()
            run.drain_budget = budget
            return
        self._stop_workers(why, drain=False)

    def _advance_stop(self) -> None:
        run = self.running
        if run is None or run.draining_since is None:
            return
        codes = run.group.poll()
        over = time.monotonic() - run.draining_since >= run.drain_budget
        if all(c is not None for c in codes) or over or self.signals.count > 1:
            if over:
                log.warning("workers did not drain within %.0fs; stopping them", run.drain_budget)
            self._stop_workers("drained", drain=False)

    def _finish_stopping(self) -> None:
        """Block until a drain in progress is over (bounded by --drain-timeout)."""
        while self.running is not None and self.running.draining_since is not None:
            self._advance_stop()
            if self.running is not None:
                time.sleep(0.05)

    def _stop_workers(self, why: str, drain: bool) -> None:
        run = self.running
        if run is None:
            return
        t0 = time.monotonic()
        run.group.stop(self.config.shutdown_timeout)
        self.running = None
        self.metrics.workers_stopped()
        log.info("stopped local workers (%s) in %.2fs", why, time.monotonic() - t0)

    def _set_state(self, state: str) -> None:
        self.state = state
        self.metrics.state(state)

