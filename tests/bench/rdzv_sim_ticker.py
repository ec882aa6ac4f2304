"""Every lease refresh of one scale-simulator process, driven by one timer thread.

An agent refreshes its two leases from two threads of its own (rendezvous.protocol.session,
rendezvous.protocol.presence). A simulator process holding hundreds of nodes cannot: a thousand
threads waking four times a second fight over one GIL, refreshes start late, and leases
expire because of the simulator, not etcd (seen at 512 nodes on 2 cores). Here one thread
keeps every refresh in a heap by due time and hands the due ones to a few workers; each
refresh is still one LeaseKeepAlive message per lease, on the process's one keep-alive
stream, so etcd sees what N agents would send. How late refreshes were dispatched is
recorded: a saturated simulator shows there before any lease expires.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)
Step = Callable[[float], "float | None"]
# Refreshes fall due on a grid of this many seconds, so those of one process go out together:
# a burst of messages on one stream costs a fraction of the same messages one at a time
# (each wakes the stream's threads), and 50 ms is small beside a 500 ms refresh interval.
SLOT = 0.05


class Ticker:
    """rendezvous.protocol.leases.Ticker on one timer thread and ``workers`` refresh threads (a
    refresh blocks until etcd answers, so several are in flight at once)."""

    def __init__(self, workers: int = 32) -> None:
        self._heap: list[tuple[float, int, Step]] = []
        self._seq = itertools.count()  # ties in due time never compare the callables
        self._cv = threading.Condition()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="refresh")
        self._closed = False
        self.late_max = 0.0  # worst delay between a refresh falling due and its start, seconds
        self.late_over_100ms = 0
        self.steps = 0
        self.errors = 0
        self.slow_max = 0.0  # the longest a step took (a refresh waiting on etcd), seconds
        threading.Thread(target=self._run, daemon=True, name="ticker").start()

    def add(self, step: Step, at: float) -> None:
        at = round(at / SLOT) * SLOT  # nearest: refreshes come no less often on average
        with self._cv:
            heapq.heappush(self._heap, (at, next(self._seq), step))
            if self._heap[0][2] is step:
                self._cv.notify()

    def lateness(self) -> dict[str, float]:
        """The worst lateness so far, and how many steps were over 100 ms late; then reset."""
        with self._cv:
            out = {"late_max_s": round(self.late_max, 3), "late_over_100ms": self.late_over_100ms,
                   "steps": self.steps, "errors": self.errors, "slow_max_s": round(self.slow_max, 3)}
            self.late_max, self.late_over_100ms, self.steps, self.slow_max = 0.0, 0, 0, 0.0
        return out

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while True:
            with self._cv:
                now = time.monotonic()
                while not self._closed and (not self._heap or self._heap[0][0] > now):
                    self._cv.wait(None if not self._heap else self._heap[0][0] - now)
                    now = time.monotonic()
                if self._closed:
                    return
                due = []
                while self._heap and self._heap[0][0] <= now:
                    at, _, step = heapq.heappop(self._heap)
                    due.append((at, step))
            try:
                for at, step in due:
                    self._pool.submit(self._step, at, step)
            except RuntimeError:  # the pool shut down: the process is exiting
                return

    def _step(self, at: float, step: Step) -> None:
        began = time.monotonic()
        with self._cv:
            late = began - at
            self.late_max = max(self.late_max, late)
            self.late_over_100ms += late > 0.1
            self.steps += 1
        try:
            after = step(began)
        except Exception:  # noqa: BLE001 - an agent's refresh thread would die: so does this lease
            log.exception("a lease refresh failed; it is no longer refreshed")
            with self._cv:
                self.errors += 1
            return
        with self._cv:
            self.slow_max = max(self.slow_max, time.monotonic() - began)
        if after is not None:
            self.add(step, after)
