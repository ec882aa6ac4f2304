"""Planned changes of the job, and workers that re-form in process.

A node leaving or one joining is a *planned* change: no completed step need be lost. Its
initiator (the leaving node; for a join, the round's group rank 0, asked by the standby)
picks a step every rank can still reach, announces it on the round in etcd, lets its own
workers reach it, and only then opens the next round. Every other agent passes the step on
to its workers (agent.daemon.steering). Workers that run the loop inside the helper pause
there and re-form in process; other helper users checkpoint there and exit; plain scripts
are stopped as before.

"Can still reach" holds however late an agent passes the step on. Each agent clears its
workers a few steps ahead (the control file's ``clear_to``; a worker starts no step past
it). The initiator first asks for a stop on the round; every agent then clears no more and
answers in etcd the last step its workers may start; the stop step is the furthest answer.
So no rank is past the stop step when it learns of it: a slow agent makes the job wait at a
step boundary, never run one step too far (which would mismatch the job's collectives).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from agent.daemon import steering
from agent.daemon.steering import StepClock, WorkersView
from agent.daemon.workers.local import LocalWorkers, Running
from rendezvous.clock import Clock
from rendezvous.errors import RendezvousError
from rendezvous.participant import Participant
from rendezvous.reasons import Reason, reason_text
from rendezvous.state import Assignment

log = logging.getLogger("elastic_agent")

ANSWER_WAIT = 3.0  # seconds an initiator waits for every member's answer before choosing without it
CLEAR_INTERVAL = 0.05  # how often the clearing thread looks at the workers' progress

_AT_REST = frozenset({"paused", "drained", "finished"})


class Plans:
    def __init__(self, participant: Participant, local: LocalWorkers, node_id: str, nproc: int, clock: Clock,
                 budget: Callable[[], float]) -> None:
        self.participant, self.local, self.node_id, self.nproc = participant, local, node_id, nproc
        self.clock, self.budget = clock, budget
        self.steps = StepClock()
        self.stopping_at: int | None = None  # the stop step our workers were told this round
        self.frozen = False  # a stop was asked for this round: we clear no more steps
        self._growth: tuple[int, float, str] | None = None  # (stop step, deadline, standby) while we grow
        self._lock = threading.Lock()  # frozen and the clearance: the loop and the clearing thread
        self._clearing: threading.Thread | None = None

    def begin_round(self) -> None:
        with self._lock:
            self.stopping_at = None
            self.frozen = False
        self._growth = None

    def look(self, run: Running, codes: list[int | None]) -> WorkersView:
        seen = steering.view(run, codes)
        if seen.step >= 0:
            self.steps.observe(seen.step, self.clock.monotonic())
        return seen

    def clear(self, run: Running, seen: WorkersView) -> None:
        """Keep our workers cleared a lead ahead of their newest step, unless a stop is near.
        Also done by a thread of its own every CLEAR_INTERVAL (keep_clearing), so that a loop
        stuck in a request to etcd does not pause the training."""
        with self._lock:
            if self.frozen or self.stopping_at is not None or run.stopping:
                return
            lead = self.steps.lead()
            if run.cleared - seen.step > lead // 2:
                return
            steering.clear(run, seen.step + lead)

    def keep_clearing(self) -> None:
        """Start the clearing thread (once): it clears the running workers, whatever the loop does."""
        if self._clearing is not None:
            return

        def clearing() -> None:
            while True:
                run = self.local.running
                try:
                    if run is not None:
                        self.clear(run, steering.view(run, [None] * len(run.progress_files)))
                except Exception as exc:  # noqa: BLE001 - a bad read must not end the thread
                    log.debug("clearing: %s", exc)
                self.clock.sleep(CLEAR_INTERVAL)

        self._clearing = threading.Thread(target=clearing, daemon=True, name="clearing")
        self._clearing.start()

    def freeze(self, run: Running, seen: WorkersView) -> int:
        """A stop was asked for: clear no more steps this round, and answer in etcd how far our
        workers may go. Returns that step."""
        with self._lock:
            furthest = max(run.cleared, seen.step)
            if self.frozen:
                return furthest
            self.frozen = True
        try:
            self.participant.planned_stop().answer(furthest)
        except RendezvousError as exc:
            log.warning("could not answer the stop asked for (%s); the initiator chooses without us", exc)
        return furthest

    def announce(self, run: Running, stop_at: int, leave: bool = False) -> None:
        with self._lock:
            steering.announce_stop(run, stop_at, leave=leave)
            self.stopping_at = stop_at

    def grow(self, run: Running, seen: WorkersView, who: str) -> None:
        """As the round's group rank 0: bring every rank to a common step, then open the
        next round for the standby ``who``."""
        if not self.local.uses_helper(run):  # plain scripts: nothing to wait for
            self._open_growth(who)
            return
        stop_at, announced = self._choose_stop(run)
        if not announced:
            return  # the round moved on meanwhile
        self.announce(run, stop_at)
        self._growth = (stop_at, self.clock.monotonic() + self.budget(), who)
        log.info("growing the job for %s after step %d", who, stop_at)

    def advance(self, run: Running, seen: WorkersView, codes: list[int | None]) -> None:
        """Keep our workers cleared; open the grown round once they reached the stop step (or
        it took too long)."""
        self.keep_clearing()
        self.clear(run, seen)
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
        stop_at, _ = self._choose_stop(run)  # not announced: only our workers know it
        self.announce(run, stop_at, leave=True)
        return True

    def can_reform(self, run: Running) -> bool:
        return not run.stopping and self.look(run, run.group.poll()).inprocess

    def reform(self, run: Running, assignment: Assignment) -> None:
        steering.reform(run, assignment, self.node_id, self.nproc, restart_count=self.local.attempt,
                        planned_stop=self.stopping_at)
        self.local.reformed(assignment)

    def _choose_stop(self, run: Running) -> tuple[int, bool]:
        """As the initiator of a planned change: ask every member how far its workers may go,
        then announce the furthest as the stop step. Returns (the step, whether announced)."""
        try:
            asked = self.participant.planned_stop().ask()
        except RendezvousError as exc:
            log.warning("could not ask for a stop in etcd (%s); only this node's workers stop", exc)
            asked = False
        mine = self.freeze(run, self.look(run, run.group.poll()))
        if not asked:
            return mine, False
        answers, complete = self._answers()
        wanted = max(mine, *answers.values())
        if not complete:  # a silent member's workers are a step ahead at most, and cleared a lead on
            wanted += self.steps.lead() + 1
        stop_at = self._announce_on_round(wanted)
        return (stop_at, True) if stop_at is not None else (wanted, False)

    def _answers(self) -> tuple[dict[str, int], bool]:
        """Every member's answer to the stop asked for, waiting up to ANSWER_WAIT (and the
        drain budget) on a watch. Returns (the answers, whether every member gave one)."""
        assert self.participant.assignment is not None
        members = set(self.participant.assignment.node_ids)
        try:
            answers, complete = self.participant.planned_stop().await_answers(members, min(ANSWER_WAIT, self.budget()))
        except RendezvousError as exc:
            log.warning("could not read the answers to the stop asked for (%s)", exc)
            return {}, False
        if not complete:
            log.warning("no answer to the stop asked for from %s; choosing the stop step without them",
                        ", ".join(sorted(members - answers.keys())))
        return answers, complete

    def _announce_on_round(self, wanted: int) -> int | None:
        try:
            return self.participant.planned_stop().announce(wanted)
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
