"""What a running node must act on, as the participant reports it (``Participant.poll``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from rendezvous.state import Assignment, JobStatus, RoundState


class NoticeKind(StrEnum):
    ROUND = "round"  # the round moved on: stop the workers and rendezvous again
    FINISHED = "finished"  # the job has an outcome
    LEASE_LOST = "lease_lost"  # cut off from etcd: fence the workers, then rejoin
    # With ``planned_changes`` only: a planned change of the current round was announced.
    FREEZE = "freeze"  # a stop was asked for: clear no more steps, answer how far the workers may go
    STOP = "stop"  # every rank stops (or re-forms) after step ``stop_at``
    GROW = "grow"  # a standby asks this node, the round's group rank 0, to grow the job


@dataclass(frozen=True)
class Notice:
    """Something a running node must act on."""

    kind: NoticeKind
    detail: str
    round: RoundState | None = None
    status: JobStatus | None = None
    stop_at: int | None = None


class PlannedNotices:
    """Reports a stop asked for, a stop step or a grow request newly set on the current
    round, once each.
    Without ``planned_changes`` the caller handles neither: group rank 0 grows the job at
    once (returned as ``grow_now``) and stop steps are not reported."""

    def __init__(self, planned_changes: bool) -> None:
        self.planned_changes = planned_changes
        # (round, stop_at, grow, stop_asked) last reported
        self._told: tuple[int, int | None, str, bool] = (0, None, "", False)

    def running(self, rnd: RoundState, assignment: Assignment, node_id: str) -> tuple[Notice | None, str]:
        """While running in ``assignment``'s round, given the current round record: (the
        notice to report, or None; the standby to grow the job for at once, or "")."""
        if rnd.number != assignment.round or rnd.is_open:
            return Notice(NoticeKind.ROUND, rnd.reason or f"round {rnd.number}", round=rnd), ""
        return self.notice(rnd, assignment.group_rank(node_id) == 0)

    def notice(self, rnd: RoundState, is_group_rank_0: bool) -> tuple[Notice | None, str]:
        """(the notice to report, or None; the standby to grow the job for at once, or "")."""
        _, told_stop, told_grow, told_asked = (self._told if self._told[0] == rnd.number
                                               else (rnd.number, None, "", False))
        # One notice at a time, each marked told only once reported: a record that changed
        # twice between two polls still yields both.
        if rnd.grow_request and rnd.grow_request != told_grow:
            self._told = (rnd.number, told_stop, rnd.grow_request, told_asked)
            if is_group_rank_0:
                if not self.planned_changes:
                    return None, rnd.grow_request
                return Notice(NoticeKind.GROW, f"{rnd.grow_request} is waiting", round=rnd), ""
        if self.planned_changes and rnd.stop_asked and not told_asked and rnd.stop_at is None:
            self._told = (rnd.number, told_stop, rnd.grow_request, True)
            return Notice(NoticeKind.FREEZE, "a planned stop was asked for", round=rnd), ""
        self._told = (rnd.number, rnd.stop_at, rnd.grow_request, rnd.stop_asked)
        if self.planned_changes and rnd.stop_at is not None and rnd.stop_at != told_stop:
            return Notice(NoticeKind.STOP, f"stop after step {rnd.stop_at}", round=rnd, stop_at=rnd.stop_at), ""
        return None, ""
