"""A planned stop stays safe when an agent is slow: each agent clears its workers a few steps
ahead, a stop is first asked for (every agent then clears no more and answers how far its
workers may go), and the stop step is the furthest answer. Pure logic: a fake participant,
a fake clock, real control files in a temporary directory."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.daemon import steering
from agent.daemon.planning import ANSWER_WAIT, Plans
from agent.daemon.steering import WorkersView
from agent.worker import control
from rendezvous.clock import FakeClock
from rendezvous.protocol.notices import NoticeKind, PlannedNotices
from rendezvous.state import Assignment, Member, RoundPhase, RoundState

NODES = ("node-0", "node-1", "node-2")


def closed(**changes) -> RoundState:
    members = tuple(Member(n, "127.0.0.1", 1) for n in NODES)
    return RoundState(2, RoundPhase.CLOSED, assignment=Assignment(2, members, "127.0.0.1", 29500), **changes)


class FakeStop:
    """The round's planned stop in etcd, shared by every member."""

    def __init__(self, answers: dict[str, int] | None = None, clock: FakeClock | None = None) -> None:
        self.clock = clock
        self.asked = False
        self.answers_given = dict(answers or {})
        self.stop_at: int | None = None

    def ask(self) -> bool:
        self.asked = True
        return True

    def answer(self, step: int) -> None:
        self.answers_given["node-0"] = step

    def answers(self) -> dict[str, int]:
        return dict(self.answers_given)

    def await_answers(self, members: set[str], timeout: float) -> tuple[dict[str, int], bool]:
        complete = members <= self.answers_given.keys()
        if not complete and self.clock is not None:  # nobody else answers: the whole wait passes
            self.clock.sleep(timeout)
        return dict(self.answers_given), complete

    def announce(self, step: int) -> int:
        self.stop_at = step if self.stop_at is None else self.stop_at
        return self.stop_at


class FakeParticipant:
    def __init__(self, stop: FakeStop) -> None:
        self.stop = stop
        self.assignment = closed().assignment

    def planned_stop(self) -> FakeStop:
        return self.stop


def running(tmp_path: Path, step: int) -> SimpleNamespace:
    progress = tmp_path / "progress.json"
    progress.write_text(f'{{"v": 1, "step": {step}, "time": 0, "mono": 0, "pid": 1, "phase": "train", '
                        f'"mode": "step", "round": 2}}')
    run = SimpleNamespace(control_file=tmp_path / "control", progress_files=[progress], cleared=-1, stopping=False,
                          group=SimpleNamespace(poll=lambda: [None]), assignment=closed().assignment)
    control.write(run.control_file, control.Control(clear_to=-1))
    return run


def plans_for(stop: FakeStop, clock: FakeClock | None = None) -> Plans:
    local = SimpleNamespace(uses_helper=lambda run: True)
    plans = Plans(FakeParticipant(stop), local, "node-0", 1, clock or FakeClock(), lambda: 60.0)  # type: ignore[arg-type]
    plans.steps.period = 0.05  # as measured: a lead of 7 steps
    return plans


def told(run: SimpleNamespace) -> control.Control:
    return control.Reader(run.control_file).read()


def view(step: int) -> WorkersView:
    return WorkersView(inprocess=False, broken=False, step=step, slowest=step, phases=frozenset({"train"}))


def test_the_agent_clears_its_workers_a_lead_ahead_and_no_further_once_a_stop_is_asked_for(tmp_path):
    plans, run = plans_for(FakeStop()), running(tmp_path, 10)
    lead = plans.steps.lead()
    plans.clear(run, view(10))
    assert told(run).clear_to == 10 + lead
    plans.clear(run, view(11))  # plenty of room left: the file is not rewritten every step
    assert told(run).clear_to == 10 + lead
    plans.clear(run, view(10 + lead - lead // 2))
    assert told(run).clear_to == 10 + lead - lead // 2 + lead
    cleared = told(run).clear_to
    assert plans.freeze(run, view(13)) == cleared  # the answer: how far the workers may go
    plans.clear(run, view(cleared))
    assert told(run).clear_to == cleared  # frozen: nothing more until the stop step is told


def test_the_initiator_announces_the_furthest_answer_and_its_workers_are_cleared_to_it(tmp_path):
    stop = FakeStop({"node-1": 30, "node-2": 27})  # node-1's agent had cleared more than ours
    plans, run = plans_for(stop), running(tmp_path, 20)
    plans.clear(run, view(20))
    assert plans.leave(run) is True  # type: ignore[arg-type]
    assert stop.asked and stop.answers_given["node-0"] == 20 + plans.steps.lead()  # ours, in etcd
    assert stop.stop_at == 30 and plans.stopping_at == 30
    assert (told(run).stop_at, told(run).clear_to, told(run).leave) == (30, 30, True)


def test_an_answer_that_never_comes_is_waited_for_at_most_answer_wait_then_a_lead_and_a_step_added(tmp_path):
    clock = FakeClock()
    stop = FakeStop({"node-1": 25}, clock)  # node-2 is silent
    plans, run = plans_for(stop, clock), running(tmp_path, 20)
    began = clock.monotonic()
    assert plans.leave(run) is True  # type: ignore[arg-type]
    assert ANSWER_WAIT <= clock.monotonic() - began < ANSWER_WAIT + 0.1
    assert stop.stop_at == 25 + plans.steps.lead() + 1


def test_a_stop_asked_for_is_reported_once_then_the_stop_step_even_when_both_came_in_one_update():
    notices = PlannedNotices(planned_changes=True)
    assert notices.notice(closed(), False) == (None, "")
    first, _ = notices.notice(closed(stop_asked=True, stop_at=None), False)
    assert first is not None and first.kind == NoticeKind.FREEZE
    assert notices.notice(closed(stop_asked=True), False) == (None, "")  # once
    stop, _ = notices.notice(closed(stop_asked=True, stop_at=40), False)
    assert stop is not None and (stop.kind, stop.stop_at) == (NoticeKind.STOP, 40)
    # a grow request and a stop step that arrive together on group rank 0: both are reported
    fresh = PlannedNotices(planned_changes=True)
    grow, _ = fresh.notice(closed(grow_request="node-3", stop_at=41), True)
    stop, _ = fresh.notice(closed(grow_request="node-3", stop_at=41), True)
    assert (grow.kind, stop.kind, stop.stop_at) == (NoticeKind.GROW, NoticeKind.STOP, 41)


def test_a_round_with_a_stop_asked_for_survives_etcd_and_old_records_have_none():
    rnd = closed(stop_asked=True, stop_at=12)
    assert RoundState.decode("/k", rnd.encode()).with_members("/m", rnd.encode_members()) == rnd
    assert RoundState.decode("/k", closed().encode()).stop_asked is False


@pytest.mark.parametrize("raw, expected", [
    (b'{"v": 1, "seq": 3, "clear_to": 17}', 17),
    (b'{"v": 1, "seq": 3}', None),  # no limit: torchrun, or an agent that clears nothing
    (b'{"v": 1, "seq": 3, "clear_to": true}', None),
    (b'{"v": 1, "seq": 3, "clear_to": "17"}', None),
])
def test_the_control_file_carries_the_clearance(raw, expected):
    assert control.Control.decode(raw).clear_to == expected
    assert control.Control.decode(control.Control(clear_to=expected).encode()).clear_to == expected


def test_a_worker_waits_at_a_step_boundary_until_its_agent_clears_the_next_step(tmp_path):
    path = tmp_path / "control"
    control.write(path, control.Control(seq=1, clear_to=5))
    reader = control.Reader(path)
    assert control.await_clearance(reader, 5).clear_to == 5  # cleared already: no wait
    done = threading.Event()
    result: list[control.Control] = []

    def worker() -> None:
        result.append(control.await_clearance(reader, 6))
        done.set()

    threading.Thread(target=worker, daemon=True).start()
    assert not done.wait(0.2)  # step 6 is not cleared: the worker waits
    run = SimpleNamespace(control_file=path, cleared=5)
    steering.clear(run, 8)  # type: ignore[arg-type]
    assert done.wait(5.0)
    assert result[0].clear_to == 8


def test_a_stop_step_ends_the_wait_and_so_does_the_callers_condition(tmp_path):
    path = tmp_path / "control"
    control.write(path, control.Control(seq=1, clear_to=5, stop_at=5))
    assert control.await_clearance(control.Reader(path), 6).stop_at == 5  # stop now, at step 5
    control.write(path, control.Control(seq=2, clear_to=5, abort=2))
    began = time.monotonic()
    assert control.await_clearance(control.Reader(path), 6, until=lambda ask: ask.abort >= 2).abort == 2
    assert time.monotonic() - began < 1.0


def test_the_initiator_waits_for_a_late_answer_on_a_watch_not_by_reading_cleared_again_and_again(tmp_path):
    """Issue 25: it read rounds/<n>/cleared/ every 10 ms for up to 3 s (O(N) bytes each time)."""
    from rendezvous.clock import SystemClock
    from rendezvous.memory_store import MemoryStore
    from rendezvous.protocol.rounds import PlannedStop
    from rendezvous.settings import Settings

    store, settings = MemoryStore(), Settings(job_id="j", min_nodes=1, max_nodes=3)
    store.put(settings.round_key, closed().encode())
    store.put(settings.members_key(2), closed().encode_members())
    store.put(f"{settings.cleared_prefix(2)}node-1", b"30")
    participant = FakeParticipant(FakeStop())
    participant.planned_stop = lambda: PlannedStop(store, settings, 2, "node-0")  # type: ignore[method-assign]
    plans = Plans(participant, SimpleNamespace(uses_helper=lambda run: True), "node-0", 1,  # type: ignore[arg-type]
                  SystemClock(), lambda: 60.0)
    run = running(tmp_path, 20)
    late = threading.Timer(0.3, lambda: store.put(f"{settings.cleared_prefix(2)}node-2", b"41"))
    late.start()
    began = time.monotonic()
    try:
        assert plans.leave(run) is True  # type: ignore[arg-type]
    finally:
        late.cancel()
    assert plans.stopping_at == 41 and time.monotonic() - began < ANSWER_WAIT  # the late answer counted
    assert store.requests.snapshot().get("get_prefix", 0) <= 2


def test_a_re_form_after_a_planned_change_names_its_stop_step_and_one_after_a_failure_none(tmp_path):
    """A worker that passed the stop step may first read the re-form that follows it (its
    agent moved on before it read the stop): the re-form says which stop it follows, so the
    worker names the planned change, not a lost group."""
    stop = FakeStop({"node-1": 30, "node-2": 27})
    plans, run = plans_for(stop), running(tmp_path, 20)
    plans.grow(run, view(20), "node-3")
    nxt = Assignment(3, tuple(Member(n, "127.0.0.1", 1) for n in NODES), "127.0.0.1", 29501)
    plans.local.reformed = lambda assignment: None
    plans.local.attempt = 0
    plans.reform(run, nxt)  # type: ignore[arg-type]
    assert (told(run).stop_at, told(run).reform.round, told(run).reform.planned_stop) == (None, 3, 30)
    plans.begin_round()
    plans.reform(run, Assignment(4, nxt.members, "127.0.0.1", 29502))  # type: ignore[arg-type]
    assert told(run).reform.planned_stop is None  # a failure: no stop step led here
