"""A SIGTERM that reaches the agent while it waits in a rendezvous, its in-process workers
still alive between rounds (found by `make chaos`'s soak: the agent crashed with an
AssertionError, exit 1 and no clean leave, instead of leaving with exit 3)."""

from __future__ import annotations

from types import SimpleNamespace

from agent.daemon.planning import Plans
from rendezvous.clock import SystemClock


class _Participant:
    assignment = None  # in a rendezvous: the round our workers ran is over

    def planned_stop(self) -> object:
        raise AssertionError("no round to announce a stop step on")


class _Local:
    def uses_helper(self, run: object) -> bool:
        return True


def test_a_leave_during_a_rendezvous_announces_nothing_and_stops_the_workers():
    plans = Plans(_Participant(), _Local(), "node-0", 1, SystemClock(), lambda: 60.0)  # type: ignore[arg-type]
    run = SimpleNamespace(group=SimpleNamespace(poll=lambda: [None]))
    assert plans.leave(run) is False  # type: ignore[arg-type]
    assert plans.stopping_at is None
