"""Bounded waits and process checks shared by every test level and the benchmarks.

Every wait in the suite goes through :func:`wait_until`, which has a deadline; nothing
sleeps in place of synchronisation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from agent.daemon.workers.procfs import alive  # noqa: F401 - one /proc reader for the suite

T = TypeVar("T")

DEFAULT_WAIT_S = 10.0


def wait_until(predicate: Callable[[], T], timeout: float = DEFAULT_WAIT_S, what: str = "",
               interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate!r}")
        time.sleep(interval)

