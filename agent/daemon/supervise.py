"""What the agent does after each look at its workers and the job: a pure function.

The loop gathers a :class:`Look` (the workers' exit codes and progress, what the
rendezvous reported, whether a leave was asked for, whether the lease is lost, the time)
and :func:`next_action` answers with one action; the loop applies it. Nothing here reads a
clock, touches a process or talks to etcd, so every rule is table-tested.

Priorities, highest first: a leave request; a lost lease (fence at once, whatever else is
going on); the job's outcome, a new round, or a planned change announced; a local worker
failure (an exit, or an in-process worker whose process group broke); a hang; every local
worker done.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.daemon import policy
from agent.daemon.policy import Progress
from rendezvous.protocol.notices import Notice, NoticeKind
from rendezvous.reasons import PLANNED, Reason, reason_kind
from rendezvous.state import RoundState


@dataclass(frozen=True)
class Look:
    codes: tuple[int | None, ...]  # by local rank; None while running, negative: killed by signal
    progress: tuple[Progress | None, ...]  # by local rank; the helper's last report
    notice: Notice | None  # what the rendezvous reported since the last look
    leave: str | None  # why this node was asked to leave, if it was
    lease_lost: str | None  # why our lease is gone, if it is
    now: float  # the host's monotonic clock (the progress reports' ``mono``)
    started: float  # when the workers started, same clock
    hang_timeout: float  # 0: hang detection off
    done_reported: bool  # this node already told etcd its workers all exited 0
    broken: bool = False  # an in-process worker's process group broke; it waits to re-form
    stopping_at: int | None = None  # the stop step this node's workers were told, if any


@dataclass(frozen=True)
class Keep:
    """Nothing to do: look again."""


@dataclass(frozen=True)
class Leave:
    why: str


@dataclass(frozen=True)
class Fence:
    why: str


@dataclass(frozen=True)
class Finish:
    outcome: str
    reason: str


@dataclass(frozen=True)
class FollowRound:
    """The job moved to a new round: restart the local workers in it. A planned change (a
    node joining) lets them finish their step and checkpoint first."""

    round: RoundState
    kind: str  # the round's Reason
    drain: bool


@dataclass(frozen=True)
class Announce:
    """A step to stop after was announced for the current round: tell the workers."""

    stop_at: int


@dataclass(frozen=True)
class Freeze:
    """A planned stop was asked for: clear no more steps, answer how far the workers may go."""


@dataclass(frozen=True)
class Grow:
    """A standby asks this node (the round's group rank 0) to grow the job."""

    who: str


@dataclass(frozen=True)
class Fail:
    """A local failure: open the next round and restart. ``ranks``: the failed local ranks,
    first failure first (WORKER_FAILURE), or the silent ones (HANG)."""

    kind: Reason
    ranks: tuple[int, ...]
    keep_workers: bool = False  # in-process workers wait to re-form: do not stop them


@dataclass(frozen=True)
class ReportDone:
    """Every local worker exited 0: tell etcd (the last member to do so ends the job)."""


Action = Keep | Leave | Fence | Finish | FollowRound | Announce | Freeze | Grow | Fail | ReportDone


def drain_survives(notice: Notice) -> bool:
    """Whether workers draining to an announced stop step can still reach it after ``notice``:
    not once a member broke the round (its collectives stall every rank short of the step,
    until --drain-timeout), the job ended, or our lease is gone."""
    if notice.kind in (NoticeKind.FINISHED, NoticeKind.LEASE_LOST):
        return False
    if notice.kind == NoticeKind.ROUND and notice.round is not None:
        return reason_kind(notice.round.reason) in PLANNED
    return True


def next_action(look: Look) -> Action:
    if look.leave is not None:
        return Leave(f"asked to leave ({look.leave})")
    if look.lease_lost is not None:
        return Fence(look.lease_lost)
    notice = look.notice
    if notice is not None:
        if notice.kind == NoticeKind.FINISHED:
            assert notice.status is not None
            return Finish(notice.status.outcome, notice.status.reason)
        if notice.kind == NoticeKind.LEASE_LOST:
            return Fence(notice.detail)
        if notice.kind == NoticeKind.STOP:
            assert notice.stop_at is not None
            return Announce(notice.stop_at)
        if notice.kind == NoticeKind.FREEZE:
            return Freeze()
        if notice.kind == NoticeKind.GROW:
            return Grow(notice.round.grow_request if notice.round is not None else "")
        assert notice.round is not None
        # A planned change (announced as a step to stop after) lets the workers reach it;
        # anything else stops them now, even with a stop step announced: a member lost on the
        # way there stalls every rank's collective short of it (they would wait out the drain).
        return FollowRound(notice.round, reason_kind(notice.round.reason),
                           drain=look.stopping_at is not None and drain_survives(notice))
    verdict = policy.judge_exits(list(look.codes))
    if verdict.failed:
        return Fail(Reason.WORKER_FAILURE, verdict.failed)
    if look.broken:
        broken = tuple(r for r, p in enumerate(look.progress) if p is not None and p.phase == "broken")
        return Fail(Reason.WORKER_FAILURE, broken, keep_workers=True)
    silent = policy.silent_ranks(list(look.progress), list(look.codes), look.hang_timeout, look.now,
                                 look.started)
    if silent:
        return Fail(Reason.HANG, tuple(silent))
    if verdict.all_succeeded and not look.done_reported:
        return ReportDone()
    return Keep()
