"""The agent's one loop: rendezvous, run the local workers, watch, restart, finish.

Signal handlers and watch callbacks only record; this loop acts. After each look at the
workers and the job, :func:`agent.daemon.supervise.next_action` (pure) says what to do and
the loop does it. The clock and the worker-group factory are parameters, so the loop runs
in-process in tests over the in-memory store with a recording fake group.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping

from agent import __version__
from agent.common.states import State
from agent.daemon import policy, steering, supervise
from agent.daemon.bookkeeping import Bookkeeping
from agent.daemon.config.console import ConsoleSettings
from agent.daemon.config.layers import AgentConfig
from agent.daemon.connection import reconnect
from agent.daemon.connection.fence_guard import FenceGuard
from agent.daemon.connection.reach_watch import PeerWatch
from agent.daemon.endings import Endings
from agent.daemon.planning import Plans
from agent.daemon.signals import Signals
from agent.daemon.straggler_watch import StragglerWatch
from agent.daemon.workers.env import resolve_nproc
from agent.daemon.workers.local import GroupFactory, Layout, LocalWorkers, Running, process_group
from agent.daemon.workers.prewarm import prewarmable
from agent.errors import EXIT_PREEMPTED
from agent.observe.collectors import CheckpointCollector
from agent.observe.metrics import AgentMetrics
from rendezvous.clock import Clock, SystemClock
from rendezvous.errors import CorruptStateError, JobFinishedError, LeaseLostError, StoreUnavailableError
from rendezvous.participant import Participant
from rendezvous.reasons import PLANNED, Reason, reason_text
from rendezvous.settings import Settings
from rendezvous.state import Assignment, NodeRecord, Outcome
from rendezvous.store import Store

log = logging.getLogger("elastic_agent")

PREWARM_DELAY = 2.0  # workers run this long before the next ones are pre-started (spare the CPU)
REASON_LIMIT = 400  # a round's reason is stored in etcd: keep it short


class SnapshotKey:
    """The job's snapshot key (agent.worker.snapshot_wire): the first agent's random one, kept
    in etcd (every member reads the same), asked once; None, with a warning, when etcd does
    not give one (workers then keep their snapshots on their node)."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store, self.key = store, settings.snapshot_key_key
        self.value: bytes | None = None

    def __call__(self) -> bytes | None:
        if self.value is None:
            try:
                value = self.store.get_or_create(self.key, secrets.token_hex(32).encode()).value
            except (StoreUnavailableError, CorruptStateError) as exc:
                log.warning("no snapshot key from etcd (%s); in-memory snapshots stay on this node", exc)
                return None
            self.value = value if len(value) >= 32 else None
        return self.value


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
        self.peers = PeerWatch.of(self, environ)  # its probe server's port goes in our node record
        me = NodeRecord(config.node_id, config.node_addr, self.nproc, os.uname().nodename, __version__, self.peers.port)
        self.participant = Participant(store, self.settings, me, clock=self.clock, planned_changes=True,
                                       workers_ready=lambda: self.local.warm_ready(), admission=self.peers.admit)
        layout = Layout(tuple(config.command), self.nproc, config.node_id, config.job_id, config.log_dir,
                        config.checkpoint_dir, config.max_restarts, config.shutdown_timeout, config.log_keep,
                        ConsoleSettings.of(config), config.local_rank_arg, config.abort_timeout,
                        SnapshotKey(store, self.settings))
        self.local = LocalWorkers(layout, environ, self.clock, factory=group_factory,
                                  prewarm=config.prewarm and prewarmable(config.command),
                                  on_stopped=self.metrics.workers_stopped)
        checkpoints = checkpoints or CheckpointCollector(config.checkpoint_dir, self.metrics.labels)
        self.books = Bookkeeping(store, self.settings, config.node_id, self.metrics, checkpoints, self.clock)
        self.stragglers = StragglerWatch.of(config, store, self.metrics, self.clock, self.participant, self.signals)
        self.state = State.INITIALIZING
        self.heartbeat = self.clock.monotonic()
        self.signals.on_wake = self.participant.wake
        self.plans = Plans(self.participant, self.local, config.node_id, self.nproc, self.clock,
                           lambda: config.drain_timeout)
        self.end = Endings(config, self.local, self.participant, self.metrics, self.signals, self.clock,
                           self._set_state, self._beat, self.plans)

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
        guard = FenceGuard(lambda: self.participant.session, self.local.running_pgids,
                           self.local.layout.abort_grace, self.clock).start()
        log.info("node %s joined job %s (min %d, max %d nodes, %d workers per node)",
                 cfg.node_id, cfg.job_id, cfg.min_nodes, cfg.max_nodes, self.nproc)
        try:
            return self._loop()
        finally:
            guard.close()
            self.peers.close()
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
        while not self.peers.check(assignment, self._tick):  # a member is cut off: the next round
            assignment = self.participant.next_assignment(on_tick=self._tick)
        self.books.rendezvous(entered=False)
        _check_nproc(assignment, self.config.node_id, self.nproc, self.settings.round_key)
        self.metrics.rendezvous_done(self.clock.monotonic() - started, assignment, self.config.node_id)
        _log_round(assignment, self.config.node_id)
        return assignment

    def _tick(self) -> None:
        """The rendezvous calls this at least every 0.5 s: stay live, advance a stop, honour a leave."""
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
        barrier = _ExitBarrier(self.participant, self.store, self.settings, self.config.exit_barrier_timeout, self.clock)
        while True:
            self.heartbeat = self.clock.monotonic()
            barrier.tick()
            self.books.tick()
            session = self.participant.session
            lost = session.lost_reason if session is not None and session.lost.is_set() else None
            notice = None
            if lost is None and not self.signals.count:
                notice = self.participant.poll(self.config.monitor_interval)
            codes = tuple(run.group.poll())
            progress = tuple(policy.read_progress(run.progress_files))
            self.metrics.progress(progress)
            self.stragglers.tick(progress, run)
            self.peers.tick(self.participant.assignment)
            seen = self.plans.look(run, list(codes))
            self.plans.advance(run, seen, list(codes))
            if seen.inprocess:  # not restarted when the job changes: nothing to pre-start
                self.local.retire_warm()
            elif self.clock.monotonic() - run.started_at >= PREWARM_DELAY:
                self.local.fill_warm()
            look = supervise.Look(codes, progress, notice, self.signals.leave_requested, lost,
                                  now=self.clock.monotonic(), started=run.started_at,
                                  hang_timeout=self.config.hang_timeout, done_reported=barrier.reported,
                                  broken=seen.broken, stopping_at=self.plans.stopping_at)
            action = supervise.next_action(look)
            if isinstance(action, supervise.ReportDone):
                barrier.report(len(codes))
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
            log.info("round %d opened (%s): restarting the local workers", action.round.number, action.round.reason)
            self.local.begin_stop(action.round.reason, drain=action.drain, budget=self.config.drain_timeout,
                                  planned=action.kind in PLANNED)
            return None
        assert isinstance(action, supervise.Fail)
        reason = _failure_reason(action, run, self.config.node_id, self.config.hang_timeout)
        self.metrics.restart(action.kind)
        self._set_state(State.RESTARTING)
        self.participant.request_new_round(reason)  # first, so the other nodes react at once
        if not action.keep_workers:
            self.local.begin_stop(reason, drain=False, budget=0.0, planned=False)
        return None

    def _beat(self) -> None:
        self.heartbeat = self.clock.monotonic()

    def _set_state(self, state: State) -> None:
        self.state = state
        self.metrics.state(state)


def _log_round(assignment: Assignment, node: str) -> None:
    log.info("round %d: %d nodes, world size %d; this node is group rank %s; master %s:%d", assignment.round,
             len(assignment.members), assignment.world_size, assignment.group_rank(node),
             assignment.master_addr, assignment.master_port)


def _check_nproc(assignment: Assignment, node: str, nproc: int, round_key: str) -> None:
    """Someone else may have written the assignment: never run a world of the wrong size."""
    mine = next(m for m in assignment.members if m.node_id == node)
    if mine.nproc != nproc:
        raise CorruptStateError(round_key, f"{mine.node_id} with nproc {nproc}",
                                f"nproc {mine.nproc} in round {assignment.round}")


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


class _ExitBarrier:
    """This node's end of the job: report that its workers all exited 0, then (once a second)
    bound the wait for a last node whose workers linger."""

    def __init__(self, participant: Participant, store: Store, settings: Settings, bound: float,
                 clock: Clock) -> None:
        self.participant, self.store, self.settings = participant, store, settings
        self.bound, self.clock = bound, clock
        self.reported = False
        self.done_at = self.next_check = 0.0

    def report(self, workers: int) -> None:
        log.info("all %d local workers exited 0; waiting for the other nodes", workers)
        self.reported = _report_done(self.participant)
        self.done_at = self.next_check = self.clock.monotonic()

    def tick(self) -> None:
        now = self.clock.monotonic()
        if self.reported and now >= self.next_check:
            self.next_check = now + 1.0
            self.end_a_lingering_node(now - self.done_at)

    def end_a_lingering_node(self, waited: float) -> None:
        """Bound the wait for the last node: its workers may have finished their work and hang
        in teardown (a deadlock in torch's gloo teardown did, docs/migrating.md). Once every
        other node is done and it still is not after --exit-barrier-timeout, the job ends as
        succeeded (as torch's exit barrier gives up after its timeout); that node's agent then
        stops its workers and exits like the others."""
        if waited < self.bound:
            return
        try:
            lingering = self.not_done()
            if len(lingering) != 1:
                return
            log.warning("node %s's workers still run %.0fs after every other node's exited 0 "
                        "(--exit-barrier-timeout %gs): the job ends as succeeded without them", lingering[0],
                        waited, self.bound)
            self.participant.finish(Outcome.SUCCEEDED, f"every node's workers exited 0 but {lingering[0]}'s, "
                                    f"which still ran {waited:.0f}s later (--exit-barrier-timeout) and were stopped")
        except StoreUnavailableError as exc:
            log.warning("could not check on the last node yet (%s); retrying", exc)

    def not_done(self) -> list[str]:
        """The members of this round whose workers have not all exited 0 (yet)."""
        assignment = self.participant.assignment
        assert assignment is not None
        prefix = self.settings.done_prefix(assignment.round)
        done = {kv.key[len(prefix):] for kv in self.store.get_prefix(prefix)[0]}
        return [node for node in assignment.node_ids if node not in done]


def _report_done(participant: Participant) -> bool:
    try:
        participant.report_done()
    except StoreUnavailableError as exc:
        log.warning("could not report completion yet (%s); retrying", exc)
        return False
    return True
