"""Watching one round: until the round ends, each tick looks at the workers, the job and the
leave requests, asks :func:`agent.daemon.supervise.next_action` (pure) what to do, and does it.

Apart from the loop (agent.daemon.loop), which moves between rounds (rendezvous, start or
re-form the workers, watch, go round again): this is the inside of one round, and the only
place a round's action (leave, fence, finish, follow a new round, report a failure) turns
into effects. Also here: the exit barrier at the job's end, and the reason a failure is
stored under in etcd.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from agent.common.states import State
from agent.daemon import policy, steering, supervise
from agent.daemon.workers.local import Running
from rendezvous.clock import Clock
from rendezvous.errors import StoreUnavailableError
from rendezvous.participant import Participant
from rendezvous.reasons import PLANNED, Reason, reason_text
from rendezvous.settings import Settings
from rendezvous.state import Outcome
from rendezvous.store import Store

if TYPE_CHECKING:
    from agent.daemon.loop import Agent

log = logging.getLogger("elastic_agent")

PREWARM_DELAY = 2.0  # workers run this long before the next ones are pre-started (spare the CPU)
REASON_LIMIT = 400  # a round's reason is stored in etcd: keep it short


class RoundWatch:
    """One round of ``agent``'s, from its workers' start to the round's end."""

    def __init__(self, agent: Agent, run: Running) -> None:
        self.agent, self.run = agent, run

    def until_round_ends(self) -> int | None:
        """An exit code when the agent should exit, None when it should re-enter the rendezvous."""
        ag, run = self.agent, self.run
        barrier = _ExitBarrier(ag.participant, ag.store, ag.settings, ag.config.exit_barrier_timeout, ag.clock)
        while True:
            ag.heartbeat = ag.clock.monotonic()
            barrier.tick()
            ag.books.tick()
            session = ag.participant.session
            lost = session.lost_reason if session is not None and session.lost.is_set() else None
            notice = None
            if lost is None and not ag.signals.count:
                notice = ag.participant.poll(ag.config.monitor_interval)
            codes = tuple(run.group.poll())
            progress = tuple(policy.read_progress(run.progress_files))
            ag.metrics.progress(progress)
            ag.stragglers.tick(progress, run)
            ag.peers.tick(ag.participant.assignment)
            seen = ag.plans.look(run, list(codes))
            ag.plans.advance(run, seen, list(codes))
            if seen.inprocess:  # not restarted when the job changes: nothing to pre-start
                ag.local.retire_warm()
            elif ag.clock.monotonic() - run.started_at >= PREWARM_DELAY:
                ag.local.fill_warm()
            look = supervise.Look(codes, progress, notice, ag.signals.leave_requested, lost,
                                  now=ag.clock.monotonic(), started=run.started_at,
                                  hang_timeout=ag.config.hang_timeout, done_reported=barrier.reported,
                                  broken=seen.broken, stopping_at=ag.plans.stopping_at)
            action = supervise.next_action(look)
            if isinstance(action, supervise.ReportDone):
                barrier.report(len(codes))
            elif isinstance(action, supervise.Announce):
                ag.plans.announce(run, action.stop_at)
            elif isinstance(action, supervise.Freeze):
                ag.plans.freeze(run, seen)
            elif isinstance(action, supervise.Grow):
                ag.plans.grow(run, seen, action.who)
            elif not isinstance(action, supervise.Keep):
                return self._act(action, run, seen.inprocess)

    def _act(self, action: supervise.Action, run: Running, inprocess: bool) -> int | None:
        ag = self.agent
        if isinstance(action, supervise.Leave):
            return ag.end.leave(action.why)
        if isinstance(action, supervise.Fence):
            return ag.end.fenced(action.why)
        if isinstance(action, supervise.Finish):
            return ag.end.finished(action.outcome, action.reason)
        if isinstance(action, supervise.FollowRound):
            ag.metrics.restart(action.kind)
            ag._set_state(State.RESTARTING)
            if inprocess:  # they stay: abort a group a vanished member broke, then re-form
                log.info("round %d opened (%s): the local workers re-form in process", action.round.number,
                         action.round.reason)
                if action.drain is False:
                    steering.abort_group(run)
                return None
            log.info("round %d opened (%s): restarting the local workers", action.round.number, action.round.reason)
            ag.local.begin_stop(action.round.reason, drain=action.drain, budget=ag.config.drain_timeout,
                                  planned=action.kind in PLANNED)
            return None
        assert isinstance(action, supervise.Fail)
        reason = _failure_reason(action, run, ag.config.node_id, ag.config.hang_timeout)
        ag.metrics.restart(action.kind)
        ag._set_state(State.RESTARTING)
        ag.participant.request_new_round(reason)  # first, so the other nodes react at once
        if not action.keep_workers:
            ag.local.begin_stop(reason, drain=False, budget=0.0, planned=False)
        return None


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
