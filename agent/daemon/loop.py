"""The agent's one loop: rendezvous, run the local workers, watch, restart, finish.

Signal handlers and watch callbacks only record; this loop acts. After each look at the
workers and the job, :func:`agent.daemon.supervise.next_action` (pure) says what to do and
the loop does it. The clock and the worker-group factory are parameters, so the loop runs
in-process in tests over the in-memory store with a recording fake group.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from agent import __version__
from agent.daemon import policy, supervise
from agent.daemon.config import AgentConfig
from agent.daemon.console import ConsoleSettings
from agent.daemon.env import resolve_nproc
from agent.daemon.local import GroupFactory, Layout, LocalWorkers, Running, process_group
from agent.daemon.prewarm import prewarmable
from agent.daemon.signals import Signals
from agent.daemon.states import State
from agent.errors import EXIT_PREEMPTED
from agent.daemon import reconnect
from agent.daemon.bookkeeping import Bookkeeping
from agent.daemon import steering
from agent.daemon.endings import Endings
from agent.daemon.planning import Plans
from agent.daemon.fence_guard import FenceGuard
from agent.observe.collectors import CheckpointCollector
from agent.observe.metrics import AgentMetrics
from rendezvous.clock import Clock, SystemClock
from rendezvous.errors import CorruptStateError, JobFinishedError, LeaseLostError, StoreUnavailableError
from rendezvous.participant import Participant
from rendezvous.reasons import Reason, reason_text
from rendezvous.state import Assignment, NodeRecord
from rendezvous.store import Store

log = logging.getLogger("elastic_agent")

PREWARM_DELAY = 2.0  # workers run this long before the next ones are pre-started (spare the CPU)
REASON_LIMIT = 400  # a round's reason is stored in etcd: keep it short


class _Leave(Exception):
    """Raised from a rendezvous wait when this node was asked to leave."""


class Agent:
    def __init__(self, config: AgentConfig, store: Store, *, metrics: AgentMetrics | None = None,
                 signals: Signals | None = None, environ: Mapping[str, str] | None = None,
                 clock: Clock | None = None, group_factory: GroupFactory = process_group,
                 checkpoints: CheckpointCollector | None = None) -> None:
        self.config = config
        self.store = store
        self.clock = clock or SystemClock()
        environ = dict(os.environ if environ is None else environ)
        self.nproc = resolve_nproc(config.nproc_per_node, environ)
        self.signals = signals or Signals()
        self.metrics = metrics or AgentMetrics(config.job_id, config.node_id)
        self.settings = config.rendezvous_settings()
        me = NodeRecord(config.node_id, config.node_addr, self.nproc, host=os.uname().nodename, version=__version__)
        self.participant = Participant(store, self.settings, me, clock=self.clock, planned_changes=True,
                                       workers_ready=lambda: self.local.warm_ready())
        layout = Layout(tuple(config.command), self.nproc, config.node_id, config.job_id, config.log_dir,
                        config.checkpoint_dir, config.max_restarts, config.shutdown_timeout, config.log_keep,
                        ConsoleSettings.of(config), config.local_rank_arg)
        self.local = LocalWorkers(layout, environ, self.clock, factory=group_factory,
                                  prewarm=config.prewarm and prewarmable(config.command),
                                  on_stopped=self.metrics.workers_stopped)
        checkpoints = checkpoints or CheckpointCollector(config.checkpoint_dir, self.metrics.labels)
        self.books = Bookkeeping(store, self.settings, config.node_id, self.metrics, checkpoints, self.clock)
        self.state = State.INITIALIZING
        self.heartbeat = self.clock.monotonic()
        self.signals.on_wake = self.participant.wake
        self.plans = Plans(self.participant, self.local, config.node_id, self.nproc, self.clock,
                           lambda: config.drain_timeout)
        self.end = Endings(config, self.local, self.participant, self.metrics, self.signals, self.clock,
                           self._set_state, self._beat, self.plans)

    @property
    def running(self) -> Running | None:
        return self.local.running

    # --- the loop ------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.config
        self._set_state(State.INITIALIZING)
        self.local.fill_warm()  # the first workers import torch while etcd and the rendezvous answer
        try:
            if not reconnect.start_when_etcd_answers(self.participant, self.clock, cfg.etcd_wait,
                                                     cfg.endpoints_text or "the embedded etcd",
                                                     lambda: bool(self.signals.count), self._beat):
                self._set_state(State.STOPPED)
                log.warning("asked to leave before etcd answered; nothing to hand over")
                return EXIT_PREEMPTED
        except JobFinishedError as exc:
            return self.end.finished(exc.outcome, exc.reason, already=True)
        self.books.resume()
        guard = FenceGuard(lambda: self.participant.session, self.local.running_pgids, cfg.shutdown_timeout,
                           self.clock).start()
        log.info("node %s joined job %s (min %d, max %d nodes, %d workers per node)",
                 cfg.node_id, cfg.job_id, cfg.min_nodes, cfg.max_nodes, self.nproc)
        try:
            return self._loop()
        finally:
            guard.close()
            self.local.stop("agent exiting")
            self.local.discard_warm()
            self.books.sync()
            self.participant.close()

    def _loop(self) -> int:
        while True:
            self._set_state(State.RENDEZVOUS)
            run = self.local.running
            if run is None or run.stopping:  # new workers ahead: they import torch meanwhile
                self.local.fill_warm()
            try:
                assignment = self._rendezvous()
            except _Leave:
                return self.end.leave("asked to leave during rendezvous")
            except JobFinishedError as exc:
                return self.end.finished(exc.outcome, exc.reason)
            except LeaseLostError as exc:
                code = self.end.fenced(str(exc))
                if code is not None:
                    return code
                continue
            self._run_round(assignment)
            self._set_state(State.RUNNING)
            outcome = self._supervise()
            if outcome is not None:
                return outcome

    def _run_round(self, assignment: Assignment) -> None:
        """The round's workers: the running ones re-formed in process when they can, else
        new ones (once the old ones are gone)."""
        run = self.local.running
        if run is not None and self.plans.can_reform(run):
            self.plans.reform(run, assignment)
        else:
            self.local.finish_stopping(lambda: self.signals.insist)
            self.local.stop("replaced by the new round's workers")
            self.local.start(assignment)
        self.plans.begin_round()
        self.metrics.workers_started(self.nproc)

    def _rendezvous(self) -> Assignment:
        started = self.clock.monotonic()
        self.books.rendezvous(entered=True)
        assignment = self.participant.next_assignment(on_tick=self._tick)
        self.books.rendezvous(entered=False)
        mine = next(m for m in assignment.members if m.node_id == self.config.node_id)
        if mine.nproc != self.nproc:  # someone else wrote this assignment: never run a wrong world
            raise CorruptStateError(self.settings.round_key, f"{mine.node_id} with nproc {self.nproc}",
                                    f"nproc {mine.nproc} in round {assignment.round}")
        self.metrics.rendezvous_done(self.clock.monotonic() - started, assignment, self.config.node_id)
        log.info("round %d: %d nodes, world size %d; this node is group rank %s; master %s:%d",
                 assignment.round, len(assignment.members), assignment.world_size,
                 assignment.group_rank(self.config.node_id), assignment.master_addr,
                 assignment.master_port)
        return assignment

    def _tick(self) -> None:
        """Called by the rendezvous at least every half second: stay live, advance a stop
        in progress, and honour a leave request."""
        self.heartbeat = self.clock.monotonic()
        self.books.tick()
        self.local.advance_stop(insist=self.signals.insist)
        if self.signals.count:
            raise _Leave()

    def _supervise(self) -> int | None:
        """Watch the workers and the job until the round ends. Returns an exit code when the
        agent should exit, None when it should re-enter the rendezvous."""
        run = self.local.running
        assert run is not None
        done_reported = False
        while True:
            self.heartbeat = self.clock.monotonic()
            self.books.tick()
            session = self.participant.session
            lost = session.lost_reason if session is not None and session.lost.is_set() else None
            notice = None
            if lost is None and not self.signals.count:
                notice = self.participant.poll(self.config.monitor_interval)
            codes = tuple(run.group.poll())
            progress = tuple(policy.read_progress(run.progress_files))
            self.metrics.progress(progress)
            seen = self.plans.look(run, list(codes))
            self.plans.advance(run, seen, list(codes))
            if seen.inprocess:  # not restarted when the job changes: nothing to pre-start
                self.local.retire_warm()
            elif self.clock.monotonic() - run.started_at >= PREWARM_DELAY:
                self.local.fill_warm()
            look = supervise.Look(codes, progress, notice, self.signals.leave_requested, lost,
                                  now=self.clock.monotonic(), started=run.started_at,
                                  hang_timeout=self.config.hang_timeout, done_reported=done_reported,
                                  broken=seen.broken, stopping_at=self.plans.stopping_at)
            action = supervise.next_action(look)
            if isinstance(action, supervise.ReportDone):
                log.info("all %d local workers exited 0; waiting for the other nodes", len(codes))
                done_reported = _report_done(self.participant)
            elif isinstance(action, supervise.Announce):
                self.plans.announce(run, action.stop_at)
            elif isinstance(action, supervise.Freeze):
                self.plans.freeze(run, seen)
            elif isinstance(action, supervise.Grow):
                self.plans.grow(run, seen, action.who)
            elif not isinstance(action, supervise.Keep):
                return self._act(action, run, seen.inprocess)

    def _act(self, action: supervise.Action, run: Running, inprocess: bool) -> int | None:
        if isinstance(action, supervise.Leave):
            return self.end.leave(action.why)
        if isinstance(action, supervise.Fence):
            return self.end.fenced(action.why)
        if isinstance(action, supervise.Finish):
            return self.end.finished(action.outcome, action.reason)
        if isinstance(action, supervise.FollowRound):
            self.metrics.restart(action.kind)
            self._set_state(State.RESTARTING)
            if inprocess:  # they stay: abort a group a vanished member broke, then re-form
                log.info("round %d opened (%s): the local workers re-form in process", action.round.number,
                         action.round.reason)
                if action.drain is False:
                    steering.abort_group(run)
                return None
            log.info("round %d opened (%s): restarting the local workers", action.round.number,
                     action.round.reason)
            self.local.begin_stop(action.round.reason, drain=action.drain, budget=self.config.drain_timeout)
            return None
        assert isinstance(action, supervise.Fail)
        reason = _failure_reason(action, run, self.config.node_id, self.config.hang_timeout)
        self.metrics.restart(action.kind)
        self._set_state(State.RESTARTING)
        self.participant.request_new_round(reason)  # first, so the other nodes react at once
        if not action.keep_workers:
            self.local.begin_stop(reason, drain=False, budget=0.0)
        return None

    def _beat(self) -> None:
        self.heartbeat = self.clock.monotonic()

    def _set_state(self, state: State) -> None:
        self.state = state
        self.metrics.state(state)


def _failure_reason(action: supervise.Fail, run: Running, node: str, hang_timeout: float) -> str:
    """The round's reason for a local failure (stored in etcd, so kept short), with the root
    cause logged for the person reading this node's log."""
    if action.keep_workers:
        ranks = ", ".join(str(r) for r in action.ranks)
        log.warning("the process group of local ranks %s broke (a peer failed); they re-form in process", ranks)
        reason = reason_text(Reason.WORKER_FAILURE, f"{node} local ranks {ranks}: a collective failed")
    elif action.kind == Reason.WORKER_FAILURE:
        rank = action.ranks[0]
        summary = run.group.failure_summary(rank)
        log.error("worker failed: %s", summary)
        for line in run.group.stderr_tail(rank, lines=5):
            log.error("  [%s/%d] %s", node, rank, line)
        reason = reason_text(Reason.WORKER_FAILURE, f"{node} {summary}")
    else:
        ranks = ", ".join(str(r) for r in action.ranks)
        log.error("hang: local ranks %s reported no progress for %.0fs", ranks, hang_timeout)
        reason = reason_text(Reason.HANG, f"{node} local ranks {ranks} silent for {hang_timeout:.0f}s")
    return reason if len(reason) <= REASON_LIMIT else reason[: REASON_LIMIT - 3] + "..."


def _report_done(participant: Participant) -> bool:
    try:
        participant.report_done()
    except StoreUnavailableError as exc:
        log.warning("could not report completion yet (%s); retrying", exc)
        return False
    return True
