"""Planned changes of the job, and workers that re-form in process.

A node leaving or one joining is a *planned* change: no completed step need be lost. Its
initiator (the leaving node; for a join, the round's group rank 0, asked by the standby)
picks a step every rank can still reach, announces it on the round in etcd, lets its own
workers reach it, and only then opens the next round. Every other agent passes the step on
to its workers (agent.daemon.steering). Workers that run the loop inside the helper pause
there and re-form in process; other helper users checkpoint there and exit; plain scripts
are stopped as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.daemon import steering
from agent.daemon.local import LocalWorkers, Running
from agent.daemon.steering import StepClock, WorkersView
from rendezvous.clock import Clock
from rendezvous.errors import RendezvousError
from rendezvous.participant import Participant
from rendezvous.reasons import Reason, reason_text
from rendezvous.state import Assignment

log = logging.getLogger("elastic_agent")

_AT_REST = frozenset({"paused", "drained", "finished"})


class Plans:
    def __init__(self, participant: Participant, local: LocalWorkers, node_id: str, nproc: int, clock: Clock,
                 budget: Callable[[], float]) -> None:
        self.participant, self.local, self.node_id, self.nproc = participant, local, node_id, nproc
        self.clock, self.budget = clock, budget
        self.steps = StepClock()
        self.stopping_at: int | None = None  # the stop step our workers were told this round
        self._growth: tuple[int, float, str] | None = None  # (stop step, deadline, standby) while we grow

    def begin_round(self) -> None:
        self.stopping_at = None
        self._growth = None

    def look(self, run: Running, codes: list[int | None]) -> WorkersView:
        seen = steering.view(run, codes)
        if seen.step >= 0:
            self.steps.observe(seen.step, self.clock.monotonic())
        return seen

    def announce(self, run: Running, stop_at: int, leave: bool = False) -> None:
        steering.announce_stop(run, stop_at, leave=leave)
        self.stopping_at = stop_at

    def grow(self, run: Running, seen: WorkersView, who: str) -> None:
        """As the round's group rank 0: bring every rank to a common step, then open the
        next round for the standby ``who``."""
        if not self.local.uses_helper(run):  # plain scripts: nothing to wait for
            self._open_growth(who)
            return
        stop_at = self._announce_on_round(self.steps.stop_step(seen.step))
        if stop_at is None:
            return  # the round moved on meanwhile
        self.announce(run, stop_at)
        self._growth = (stop_at, self.clock.monotonic() + self.budget(), who)
        log.info("growing the job for %s after step %d", who, stop_at)

    def advance(self, seen: WorkersView, codes: list[int | None]) -> None:
        """Open the grown round once our workers reached the stop step (or it took too long)."""
        if self._growth is None:
            return
        stop_at, deadline, who = self._growth
        exited = all(c is not None for c in codes)
        at_rest = seen.slowest >= stop_at and seen.phases <= _AT_REST
        if exited or at_rest or self.clock.monotonic() >= deadline:
            if not (exited or at_rest):
                log.warning("workers did not reach step %d in time; growing the job anyway", stop_at)
            self._growth = None
            self._open_growth(who)

    def leave(self, run: Running) -> bool:
        """Announce a stop step before this node leaves. Returns whether the workers will
        reach it (drain) rather than be stopped at once."""
        if not self.local.uses_helper(run):
            return False
        if self.participant.assignment is None:
            # Asked to leave during a rendezvous: the round these workers ran is over, so there
            # is none to announce a step on. In-process workers wait there for their next place
            # (every survivor holds the same state); restarted ones are being stopped already.
            return False
        current = self.look(run, run.group.poll()).step
        wanted = self.steps.stop_step(current)
        stop_at = self._announce_on_round(wanted)
        self.announce(run, stop_at if stop_at is not None else wanted, leave=True)
        return True

    def can_reform(self, run: Running) -> bool:
        return not run.stopping and self.look(run, run.group.poll()).inprocess

    def reform(self, run: Running, assignment: Assignment) -> None:
        steering.reform(run, assignment, self.node_id, self.nproc, restart_count=self.local.attempt)
        self.local.reformed(assignment)

    def _announce_on_round(self, wanted: int) -> int | None:
        try:
            return self.participant.announce_stop(wanted)
        except RendezvousError as exc:
            log.warning("could not announce the stop step in etcd (%s); only this node's workers know it", exc)
            return None

    def _open_growth(self, who: str) -> None:
        assert self.participant.assignment is not None
        try:
            self.participant.open_next_round(reason_text(Reason.SCALE_UP, f"{who} is waiting"),
                                             self.participant.assignment.round)
        except RendezvousError as exc:
            log.warning("could not open the grown round (%s); the standby will", exc)
