"""The agent's one loop: rendezvous, run the local workers, watch, restart, finish.

Signal handlers and watch callbacks only record; this loop acts. Inside a round
(agent.daemon.watch), after each look at the workers and the job,
:func:`agent.daemon.supervise.next_action` (pure) says what to do and the watch does it. The clock and the worker-group factory are parameters, so the loop runs
in-process in tests over the in-memory store with a recording fake group.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping

from agent import __version__
from agent.common.states import State
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
from agent.daemon.watch import RoundWatch
from agent.daemon.workers.env import resolve_nproc
from agent.daemon.workers.local import GroupFactory, Layout, LocalWorkers, process_group
from agent.daemon.workers.prewarm import prewarmable
from agent.errors import EXIT_PREEMPTED
from agent.observe.collectors import CheckpointCollector
from agent.observe.metrics import AgentMetrics
from rendezvous.clock import Clock, SystemClock
from rendezvous.errors import CorruptStateError, JobFinishedError, LeaseLostError, StoreUnavailableError
from rendezvous.participant import Participant
from rendezvous.settings import Settings
from rendezvous.state import Assignment, NodeRecord
from rendezvous.store import Store

log = logging.getLogger("elastic_agent")



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
        """Watch the workers and the job until the round ends (agent.daemon.watch). Returns an
        exit code when the agent should exit, None when it should re-enter the rendezvous."""
        run = self.local.running
        assert run is not None
        return RoundWatch(self, run).until_round_ends()

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
