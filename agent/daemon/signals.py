"""Leave requests: signal handlers and the preemption watcher only record; the loop acts."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any


class Signals:
    """A first SIGTERM/SIGINT (or a cloud preemption notice) asks for a graceful leave; a
    second one stops the workers regardless."""

    def __init__(self) -> None:
        self.on_wake: Callable[[], None] = lambda: None  # a worker has news (SIGUSR1)
        self.count = 0
        self.deadline: float | None = None  # monotonic time the node will be terminated, if known
        self.source = "signal"

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        # An in-process worker whose process group broke says so at once, not at the next poll.
        signal.signal(signal.SIGUSR1, lambda _signum, _frame: self.on_wake())

    def _handle(self, signum: int, _frame: Any) -> None:
        self.count += 1

    def request(self, source: str, deadline: float | None = None) -> None:
        """A leave asked for by something other than a signal (a cloud preemption notice)."""
        self.source = source
        self.deadline = deadline
        self.count = max(self.count, 1)

    @property
    def leave_requested(self) -> str | None:
        """Why this node was asked to leave, or None."""
        return self.source if self.count else None

    @property
    def insist(self) -> bool:
        """Asked twice: stop the workers now, drained or not."""
        return self.count > 1
