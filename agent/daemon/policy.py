"""Pure decisions of the agent: what the workers' exits mean, who is hung.

Functions of their inputs only (no clocks read, no processes touched), table-tested.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from agent.worker.protocol import DRAINED_EXIT_CODE

__all__ = ["Progress", "Verdict", "helper_in_use", "judge_exits", "read_progress",
           "silent_ranks"]


@dataclass(frozen=True)
class Verdict:
    failed: tuple[int, ...]  # local ranks that failed, first failure first
    all_succeeded: bool  # every worker exited 0
    drained: bool  # every worker has exited, at least one at a step boundary on request


def judge_exits(codes: list[int | None]) -> Verdict:
    """``codes`` are exit codes by local rank (None: still running; negative: killed by signal)."""
    failed = tuple(r for r, c in enumerate(codes) if c is not None and c not in (0, DRAINED_EXIT_CODE))
    finished = all(c is not None for c in codes)
    return Verdict(
        failed=failed,
        all_succeeded=bool(codes) and all(c == 0 for c in codes),
        drained=finished and not failed and any(c == DRAINED_EXIT_CODE for c in codes),
    )


@dataclass(frozen=True)
class Progress:
    step: int
    time: float  # the worker's wall clock when it reported: for people and dashboards only
    # The worker's time.monotonic() when it reported. CLOCK_MONOTONIC is one clock for every
    # process of a host and never steps with NTP, so deadlines compare this, never ``time``.
    mono: float | None = None
    phase: str = ""  # train | checkpointed | drained | finished | paused | broken
    mode: str = ""  # "inprocess": the worker re-forms in process when the job changes
    round: int | None = None  # the round the worker was in when it reported
    busy: float | None = None  # seconds of the step's own work, when the worker said (stragglers)


def read_progress(files: list[Path]) -> list[Progress | None]:
    """The last progress each worker reported through the helper, None where nothing (valid) is there."""
    out: list[Progress | None] = []
    for path in files:
        try:
            data = json.loads(path.read_bytes())
            mono = data.get("mono")
            wall = float(data["time"])
            if not math.isfinite(wall):
                raise ValueError(f"time {wall}")
            out.append(Progress(int(data["step"]), wall,
                                float(mono) if isinstance(mono, (int, float)) and not isinstance(mono, bool) else None,
                                str(data.get("phase", "")), str(data.get("mode", "")),
                                data["round"] if isinstance(data.get("round"), int) else None,
                                _seconds(data.get("busy"))))
        # Whatever a worker left there: a list has no .get, int(1e400) overflows, "[[[[..." recurses.
        except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
            out.append(None)
    return out


def _seconds(value: object) -> float | None:
    """A finite, non-negative number of seconds from a progress file, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def helper_in_use(files: list[Path]) -> bool:
    return any(path.exists() for path in files)


def silent_ranks(progress: list[Progress | None], codes: list[int | None], timeout: float,
                 now: float, started: float) -> list[int]:
    """Running ranks with no progress for ``timeout`` seconds, by the host's monotonic clock
    (``now``, ``started`` and the reports' ``mono``). Applies only once the helper is seen in
    use (some rank has reported); a rank that never reported counts from the start; a report
    without a monotonic time (a helper too old to write one) is never called silent."""
    if timeout <= 0 or not any(p is not None for p in progress):
        return []
    silent = []
    for rank, (p, code) in enumerate(zip(progress, codes)):
        since = started if p is None else p.mono
        if code is None and since is not None and now - since >= timeout:
            silent.append(rank)
    return silent
