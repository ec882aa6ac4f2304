"""How this node's part in the job ends: the job's outcome, a graceful leave, or the loss of
its lease (fencing, then rejoining or ending). Each returns the agent's exit code, or None
when the agent goes round again."""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.common.states import State
from agent.daemon.config.layers import AgentConfig
from agent.daemon.connection import reconnect
from agent.daemon.planning import Plans
from agent.daemon.signals import Signals
from agent.daemon.supervise import drain_survives
from agent.daemon.workers.local import LocalWorkers, Running
from agent.errors import EXIT_FAILED, EXIT_PREEMPTED, EXIT_SUCCEEDED
from agent.observe.metrics import AgentMetrics
from rendezvous.clock import Clock
from rendezvous.participant import Participant
from rendezvous.reasons import Reason
from rendezvous.state import Outcome

log = logging.getLogger("elastic_agent")

DRAIN_MARGIN = 5.0  # of a preemption notice's time, kept for stopping workers and leaving


class Endings:
    def __init__(self, config: AgentConfig, local: LocalWorkers, participant: Participant, metrics: AgentMetrics,
                 signals: Signals, clock: Clock, set_state: Callable[[State], None],
                 beat: Callable[[], None], plans: Plans) -> None:
        self.config, self.local, self.participant, self.metrics = config, local, participant, metrics
        self.signals, self.clock, self.set_state, self.beat = signals, clock, set_state, beat
        self.plans = plans

    def finished(self, outcome: str, reason: str, already: bool = False) -> int:
        """The job has an outcome (``already``: before this agent took part)."""
        self.local.stop(f"job {outcome}")
        self.local.layout.forget_snapshots()
        said = f"job {self.config.job_id} {'already ' if already else ''}{outcome}"
        said += f" ({reason}); nothing to do" if already else f": {reason}"
        if outcome == Outcome.SUCCEEDED:
            self.set_state(State.SUCCEEDED)
            log.info("%s", said)
            return EXIT_SUCCEEDED
        self.set_state(State.FAILED)
        log.error("%s", said)
        return EXIT_FAILED

    def leave(self, why: str) -> int:
        """Graceful leave: drain the workers (every rank of the job checkpoints at the same
        step), open the next round at once, revoke our leases, exit 3."""
        self.set_state(State.STOPPING)
        self.metrics.preemption()
        log.warning("leaving job %s: %s", self.config.job_id, why)
        run = self.local.running
        if run is not None:
            # Every rank of the job is told one step to stop after: nothing completed is lost.
            drain = self.plans.leave(run)
            budget = drain_budget(self.config.drain_timeout, self.signals.deadline, self.clock.monotonic(),
                                  self.config.shutdown_timeout)
            self.local.begin_stop(why, drain=drain, budget=budget)
            self.local.finish_stopping(lambda: self._insist(run))
        self.local.layout.forget_snapshots()
        self.participant.leave(reason="preempted")
        self.set_state(State.STOPPED)
        log.warning("left job %s cleanly", self.config.job_id)
        return EXIT_PREEMPTED

    def _insist(self, run: Running) -> bool:
        """While this node drains to leave: give up the drain (SIGTERM the workers now) once the
        round moved on for a reason no rank's drain survives; SIGKILL on a second signal."""
        if run.draining_since is not None and run.terminated_at is None and self.participant.assignment:
            notice = self.participant.poll(0)
            if notice is not None and not drain_survives(notice):
                log.warning("stop step no longer reachable (%s): stopping the workers now", notice.detail)
                run.drain_budget = 0.0
        return self.signals.insist

    def fenced(self, why: str) -> int | None:
        """Our lease is gone: others may already run a newer round without us, so our workers
        must stop now (the fence guard has already signalled them), then we rejoin when etcd
        answers. Returns an exit code when the agent is done instead: the job finished while
        we were away, or a leave was asked for (nothing to hand over: exit 3 at once)."""
        log.error("lost our lease (%s): stopping local workers at once", why)
        self.metrics.restart(Reason.LEASE_LOST)
        self.local.stop("lease lost", planned=False)
        back = reconnect.rejoin(self.participant, self.clock, lambda: bool(self.signals.count), self.beat)
        if isinstance(back, reconnect.Finished):
            return self.finished(back.outcome, back.reason)
        if isinstance(back, reconnect.LeaveNow):
            self.metrics.preemption()
            self.set_state(State.STOPPED)
            log.warning("left job %s while cut off from etcd (its lease is gone already)", self.config.job_id)
            return EXIT_PREEMPTED
        return None


def drain_budget(timeout: float, terminated_at: float | None, now: float, shutdown_timeout: float = 0.0) -> float:
    """How long the workers get to drain: --drain-timeout, cut short by a known termination
    time (a preemption notice) minus what may follow a drain that ran out (SIGTERM, then
    SIGKILL after --shutdown-timeout) and the time to leave: the whole leave ends before
    the machine does."""
    if terminated_at is None:
        return timeout
    return max(0.0, min(timeout, terminated_at - now - shutdown_timeout - DRAIN_MARGIN))
