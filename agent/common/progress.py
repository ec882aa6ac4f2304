"""What each worker last reported through the helper (its progress file), as a record.

Shared vocabulary: the daemon decides on these records (``agent.daemon.policy``: who is
silent; ``agent.daemon.supervise``) and observability exports them (``agent.observe.metrics``),
so they live below both. Reading the file trusts nothing in it: a worker may leave anything
there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Progress", "read_progress"]


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
