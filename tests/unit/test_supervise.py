"""agent.daemon.supervise: the loop's decision after each look, as a table. No processes, no etcd."""

from __future__ import annotations

import pytest

from agent.daemon import supervise as s
from agent.daemon.policy import Progress
from rendezvous.protocol.notices import Notice, NoticeKind
from rendezvous.reasons import Reason
from rendezvous.state import JobStatus, Outcome, RoundState

NOW = 1000.0


def look(codes=(None, None), progress=(None, None), notice=None, leave=None, lost=None, now=NOW,
         started=NOW - 5, hang=0.0, done=False, broken=False, stopping_at=None) -> s.Look:
    return s.Look(tuple(codes), tuple(progress), notice, leave, lost, now=now, started=started,
                  hang_timeout=hang, done_reported=done, broken=broken, stopping_at=stopping_at)


def opened(reason: str) -> Notice:
    rnd = RoundState(number=3, state="open", reason=reason, previous=("a", "b"))
    return Notice(NoticeKind.ROUND, reason, round=rnd)


FINISHED = Notice(NoticeKind.FINISHED, "job done", status=JobStatus(Outcome.SUCCEEDED, "all exited 0"))
FAILED = Notice(NoticeKind.FINISHED, "job failed", status=JobStatus(Outcome.FAILED, "budget spent"))


@pytest.mark.parametrize("given, expected", [
    (look(), s.Keep()),
    # a leave request beats everything, even a failed worker or a lost lease
    (look(codes=(1, None), leave="signal", lost="cut off"), s.Leave("asked to leave (signal)")),
    (look(leave="preemption notice: aws"), s.Leave("asked to leave (preemption notice: aws)")),
    # a lost lease fences at once, whatever the workers or the rendezvous say
    (look(codes=(1, None), notice=opened("node_lost: b"), lost="not refreshed"), s.Fence("not refreshed")),
    (look(notice=Notice(NoticeKind.LEASE_LOST, "lease gone")), s.Fence("lease gone")),
    (look(notice=FINISHED), s.Finish(Outcome.SUCCEEDED, "all exited 0")),
    (look(codes=(0, 0), notice=FAILED), s.Finish(Outcome.FAILED, "budget spent")),
    # a new round: follow it; only a planned change (a stop step announced) lets the workers
    # reach their step boundary first
    (look(codes=(1, None), notice=opened("node_lost: b")), s.FollowRound(opened("node_lost: b").round, "node_lost", False)),
    (look(notice=opened("scale_up: c is waiting"), stopping_at=40),
     s.FollowRound(opened("scale_up: c is waiting").round, "scale_up", True)),
    (look(notice=opened("scale_up: c is waiting")),
     s.FollowRound(opened("scale_up: c is waiting").round, "scale_up", False)),
    (look(notice=opened("node_left: b (SIGTERM)"), stopping_at=40),
     s.FollowRound(opened("node_left: b (SIGTERM)").round, "node_left", True)),
    # a member lost (or a worker failed) on the way to an announced stop step: no rank can
    # reach it any more, so the workers stop (or abort their group) now, not at the step
    (look(notice=opened("node_lost: b"), stopping_at=40), s.FollowRound(opened("node_lost: b").round, "node_lost", False)),
    (look(notice=opened("worker_failure: b/0 exited 1"), stopping_at=40),
     s.FollowRound(opened("worker_failure: b/0 exited 1").round, "worker_failure", False)),
    # planned changes: a stop step to pass on, a standby asking group rank 0 to grow the job
    (look(notice=Notice(NoticeKind.STOP, "stop after step 40", stop_at=40)), s.Announce(40)),
    (look(notice=Notice(NoticeKind.FREEZE, "a planned stop was asked for")), s.Freeze()),
    (look(notice=Notice(NoticeKind.GROW, "c is waiting", round=RoundState(2, "closed", grow_request="c"))),
     s.Grow("c")),
    # an in-process worker whose group broke: a new round, but the workers stay
    (look(progress=(Progress(3, 0.0, NOW, "broken", "inprocess"), Progress(3, 0.0, NOW, "train", "inprocess")),
          broken=True), s.Fail(Reason.WORKER_FAILURE, (0,), keep_workers=True)),
    (look(codes=(1, None), broken=True), s.Fail(Reason.WORKER_FAILURE, (0,))),  # an exit is worse
    (look(notice=opened("node_left: b (preempted)")),
     s.FollowRound(opened("node_left: b (preempted)").round, "node_left", False)),
    # local failures: the first failed rank first; a drained exit (75) is not a failure
    (look(codes=(None, -9)), s.Fail(Reason.WORKER_FAILURE, (1,))),
    (look(codes=(2, 1)), s.Fail(Reason.WORKER_FAILURE, (0, 1))),
    (look(codes=(75, None)), s.Keep()),
    (look(codes=(75, 75)), s.Keep()),
    # hangs only once the helper is in use, counted from the last report (or the start)
    (look(progress=(Progress(3, 0.0, NOW - 31), None), hang=30), s.Fail(Reason.HANG, (0,))),  # rank 1 started 5 s ago
    (look(progress=(Progress(3, 0.0, NOW - 31), None), started=NOW - 40, hang=30), s.Fail(Reason.HANG, (0, 1))),
    (look(progress=(Progress(3, 0.0, NOW - 31), Progress(3, 0.0, NOW - 1)), hang=30), s.Fail(Reason.HANG, (0,))),
    (look(progress=(Progress(3, 0.0, NOW - 31), None), hang=0), s.Keep()),
    (look(progress=(None, None), started=NOW - 100, hang=30), s.Keep()),
    (look(codes=(0, None), progress=(Progress(3, 0.0, NOW - 31), Progress(3, 0.0, NOW - 31)), hang=30),
     s.Fail(Reason.HANG, (1,))),
    # every local worker done: report it once
    (look(codes=(0, 0)), s.ReportDone()),
    (look(codes=(0, 0), done=True), s.Keep()),
    (look(codes=(0, None)), s.Keep()),
])
def test_next_action(given: s.Look, expected: s.Action) -> None:
    assert s.next_action(given) == expected


def test_a_failure_beats_a_hang_and_completion() -> None:
    given = look(codes=(0, 1), progress=(Progress(1, 0.0, NOW - 100), None), hang=10)
    assert s.next_action(given) == s.Fail(Reason.WORKER_FAILURE, (1,))


@pytest.mark.parametrize("notice, survives", [
    (opened("node_left: b (SIGTERM)"), True),  # the planned round a leave opens
    (opened("scale_up: c is waiting"), True),
    (opened("node_lost: b"), False),  # a member vanished on the way to the stop step
    (opened("hang: b/0 silent for 30s"), False),
    (FINISHED, False),
    (Notice(NoticeKind.LEASE_LOST, "lease gone"), False),
    (Notice(NoticeKind.STOP, "stop after step 40", stop_at=40), True),
])
def test_which_news_a_drain_to_a_stop_step_survives(notice: Notice, survives: bool) -> None:
    assert s.drain_survives(notice) is survives


def _leaving(notice: Notice | None) -> tuple[object, object]:
    from types import SimpleNamespace

    from agent.daemon.endings import Endings
    participant = SimpleNamespace(assignment=object(), poll=lambda timeout: notice)
    end = Endings(None, None, participant, None, SimpleNamespace(insist=False), None, None, None, None)  # type: ignore[arg-type]
    run = SimpleNamespace(draining_since=NOW, terminated_at=None, drain_budget=60.0)
    return end, run


def test_a_leaving_node_gives_up_its_drain_when_a_member_is_lost_meanwhile() -> None:
    end, run = _leaving(opened("node_lost: c"))
    assert end._insist(run) is False  # type: ignore[attr-defined]  # SIGTERM, not SIGKILL
    assert run.drain_budget == 0.0  # type: ignore[attr-defined]


def test_a_leaving_node_keeps_draining_through_quiet_and_planned_news() -> None:
    for notice in (None, opened("scale_up: c is waiting")):
        end, run = _leaving(notice)
        end._insist(run)  # type: ignore[attr-defined]
        assert run.drain_budget == 60.0  # type: ignore[attr-defined]
