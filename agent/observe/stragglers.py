"""Stragglers: this node's step time against the job's median, and when to call it too slow.

Pure (every function of its inputs, ``now`` passed in), table-tested; the agent's I/O around
it lives in agent.daemon.straggler_watch.

A node's figure is the seconds per step its workers took over the last ``STEP_WINDOW`` steps
(from the progress files the agent reads anyway: the group's step and the host's monotonic
time). Each node publishes its own figure and reads the others' (docs/architecture.md, "The
network between nodes"), then divides its figure by the median of the round's members.

Why the verdict is slow to come: a loaded machine (a checkpoint, a neighbour's job, the CI
box) makes a healthy node slow for a while. A node is only called a straggler when its ratio
stayed at or above the factor for a whole window, over at least ``MIN_SAMPLES`` comparisons,
against a median of at least ``MIN_NODES`` figures (with two nodes the "median" is the pair's
mean, and the slow one cannot be told from the fast one being fast). Any sample under the
factor starts the window again.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

STEP_WINDOW = 8  # steps a figure is averaged over
MIN_NODES = 3  # figures a median needs
MIN_SAMPLES = 3  # comparisons, all slow, before a node is called a straggler
MAX_FIGURE = 86_400.0  # seconds per step; anything larger (or not a finite positive number) is refused


def valid_figure(value: object) -> float | None:
    """A step time read from etcd, or None when it is not a finite number in (0, MAX_FIGURE]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0 < value <= MAX_FIGURE else None


class StepClock:
    """Seconds per step of this node's workers, from (step, monotonic time, busy) samples.

    With ``busy`` (the seconds of the step's own work the worker reported, collectives' waits
    left out) the figure is its mean: in a lockstep job every node's wall time per step is the
    slowest node's, so only the work itself tells the straggler apart. Without it, the wall
    time per step (which tells apart nodes that do not wait for each other every step)."""

    def __init__(self, window: int = STEP_WINDOW) -> None:
        self._seen: deque[tuple[int, float, float | None]] = deque(maxlen=window + 1)

    def feed(self, step: int | None, mono: float | None, busy: float | None = None) -> None:
        if step is None or mono is None:
            return
        if self._seen and step <= self._seen[-1][0]:
            if step < self._seen[-1][0]:  # a restart from a checkpoint: the old pace no longer holds
                self._seen.clear()
                self._seen.append((step, mono, busy))
            return
        self._seen.append((step, mono, busy))

    def reset(self) -> None:
        """New workers (a new round): their first steps include start-up, not pace."""
        self._seen.clear()

    def figure(self) -> float | None:
        """Seconds per step over the samples held, None until two steps were seen."""
        if len(self._seen) < 2:
            return None
        busy = [b for _, _, b in list(self._seen)[1:]]
        if all(b is not None for b in busy):
            return statistics.fmean(b for b in busy if b is not None) or None
        (s0, t0, _), (s1, t1, _) = self._seen[0], self._seen[-1]
        return (t1 - t0) / (s1 - s0) if t1 > t0 else None


@dataclass(frozen=True)
class Comparison:
    mine: float
    median: float
    nodes: int  # figures the median was taken over

    @property
    def ratio(self) -> float:
        return self.mine / self.median


def compare(mine: float | None, figures: Mapping[str, float], me: str, members: frozenset[str]) -> Comparison | None:
    """This node's figure against the median of the round's members' (this node's own
    included, as ``mine``); None when there is no figure of its own or fewer than
    ``MIN_NODES`` figures in all. Figures of nodes outside the round are ignored."""
    if mine is None:
        return None
    pool = [f for node, f in figures.items() if node in members and node != me] + [mine]
    if len(pool) < MIN_NODES:
        return None
    return Comparison(mine, statistics.median(pool), len(pool))


class Verdict:
    """Hysteresis over comparisons: ``slow`` once every comparison for ``window`` seconds (and
    at least ``MIN_SAMPLES`` of them) had a ratio >= ``factor``."""

    def __init__(self, factor: float, window: float) -> None:
        self.factor, self.window = factor, window
        self._since: float | None = None
        self._samples = 0

    def observe(self, comparison: Comparison | None, now: float) -> bool:
        if comparison is None or comparison.ratio < self.factor:
            self._since, self._samples = None, 0
            return False
        if self._since is None:
            self._since = now
        self._samples += 1
        return self._samples >= MIN_SAMPLES and now - self._since >= self.window

    def reset(self) -> None:
        self._since, self._samples = None, 0
