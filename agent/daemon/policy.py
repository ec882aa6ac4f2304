"""Pure decisions of the agent: what the workers' exits mean, who is hung.

Functions of their inputs only (no clocks read, no processes touched), table-tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Progress and read_progress are named here too: the daemon's decisions read them from here.
from agent.common.progress import Progress, read_progress
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
