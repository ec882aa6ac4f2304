"""Steering this node's workers through their control file (agent.worker.control): a step to
stop after (a planned change), an abort of a broken process group, and, for workers that
re-form in process, their place in the next round. Also what the agent reads back from
their progress reports to steer them: whether they re-form in process, whether their group
broke, how fast they step.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

from agent.daemon import policy
from agent.daemon.workers.local import Running
from agent.worker import control
from rendezvous.state import Assignment

log = logging.getLogger("elastic_agent")

# How far ahead the agent clears its workers to run (agent.worker.control's clear_to): the
# agent's poll must come round before they get there, or they wait. A planned stop lands at
# most this far ahead. This much, at least two steps.
PLANNED_LEAD = 0.3
MIN_LEAD_STEPS = 2


@dataclass(frozen=True)
class WorkersView:
    """What this node's workers reported, taken together."""

    inprocess: bool  # every worker runs the loop inside the helper and is alive
    broken: bool  # some worker's process group broke (it waits to re-form)
    step: int  # the highest step a worker reported (-1: none yet)
    slowest: int  # the lowest (-1 while any worker has not reported)
    phases: frozenset[str]


def view(run: Running, codes: list[int | None]) -> WorkersView:
    reports = policy.read_progress(run.progress_files)
    alive = bool(codes) and all(c is None for c in codes)
    steps = [p.step for p in reports if p is not None]
    complete = all(p is not None for p in reports) and bool(reports)
    return WorkersView(
        inprocess=alive and complete and all(p.mode == "inprocess" for p in reports if p is not None),
        # Only this round's reports: a worker re-formed into it is no longer broken.
        broken=any(p is not None and p.phase == "broken" and p.round in (None, run.assignment.round)
                   for p in reports),
        step=max(steps, default=-1),
        slowest=min(steps) if complete else -1,
        phases=frozenset(p.phase for p in reports if p is not None),
    )


class StepClock:
    """The workers' step period, from the reports the loop reads anyway."""

    def __init__(self) -> None:
        self._last: tuple[int, float] | None = None
        self.period = 1.0  # seconds per step; pessimistic until measured

    def observe(self, step: int, now: float) -> None:
        if self._last is not None and step > self._last[0]:
            measured = (now - self._last[1]) / (step - self._last[0])
            self.period = measured if self.period == 1.0 else 0.8 * self.period + 0.2 * measured
        if self._last is None or step != self._last[0]:
            self._last = (step, now)

    def lead(self) -> int:
        """How many steps ahead of the newest the workers are cleared to run: PLANNED_LEAD's
        worth, at least MIN_LEAD_STEPS. A planned stop lands within this many steps."""
        return max(MIN_LEAD_STEPS, math.ceil(PLANNED_LEAD / max(self.period, 1e-3)) + 1)


_WRITING = threading.Lock()  # the loop and the clearing thread both write the control file


def tell(run: Running, **changes: object) -> control.Control:
    """Write the control file with ``changes`` applied to what it said before."""
    with _WRITING:
        old = control.Reader(run.control_file).read() if run.control_file.exists() else control.Control()
        fields = {"seq": old.seq + 1, "stop_at": old.stop_at, "clear_to": old.clear_to, "leave": old.leave,
                  "abort": old.abort, "reform": old.reform}
        fields.update(changes)
        new = control.Control(**fields)  # type: ignore[arg-type]
        control.write(run.control_file, new)
        return new


def clear(run: Running, upto: int) -> None:
    """Let the workers start steps up to ``upto``."""
    run.cleared = max(run.cleared, upto)
    tell(run, clear_to=run.cleared)


def announce_stop(run: Running, stop_at: int, leave: bool = False) -> None:
    log.info("workers stop after step %d%s", stop_at, " and exit: this node leaves" if leave else "")
    run.cleared = max(run.cleared, stop_at)  # every worker reaches the stop step
    tell(run, stop_at=stop_at, leave=leave, clear_to=run.cleared)


def abort_group(run: Running) -> None:
    """The round's process group is gone (a member vanished): in-process workers abort it."""
    tell(run, abort=run.assignment.round)


def reform(run: Running, assignment: Assignment, node_id: str, nproc: int, restart_count: int,
           planned_stop: int | None = None) -> None:
    """Give in-process workers their place in ``assignment``'s round; they form its group.
    ``planned_stop``: the stop step announced to them, when a planned change led here."""
    group_rank = assignment.group_rank(node_id)
    assert group_rank is not None
    place = control.Reform(round=assignment.round, rank_offset=assignment.rank_offset(node_id),
                           world_size=assignment.world_size, local_world_size=nproc, group_rank=group_rank,
                           group_world_size=len(assignment.members), master_addr=assignment.master_addr,
                           master_port=assignment.master_port, restart_count=restart_count,
                           planned_stop=planned_stop)
    tell(run, reform=place, stop_at=None, leave=False)
