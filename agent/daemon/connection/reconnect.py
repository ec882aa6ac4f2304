"""Waiting for etcd to answer: at start (etcd restarting, or starting with the job) and after
this node was fenced. Both wait with backoff, log what they wait for, honour a leave request
at once, and give up after a bounded time. Exit 2 is for usage errors only: an unreachable
etcd is an operational problem, reported with exit 1 once the wait is over."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from agent.errors import AgentError
from rendezvous.clock import Clock
from rendezvous.errors import JobFinishedError, RendezvousError, StoreConfigError, StoreUnavailableError
from rendezvous.participant import Participant

log = logging.getLogger("elastic_agent")

FIRST_PAUSE, MAX_PAUSE = 0.5, 5.0
REJOIN_TIMEOUT = 600.0  # after being fenced, how long to keep trying to reach etcd again


@dataclass(frozen=True)
class Rejoined:
    pass


@dataclass(frozen=True)
class LeaveNow:
    """A leave was asked for while etcd was away: nothing to hand over, leave at once."""


@dataclass(frozen=True)
class Finished:
    outcome: str
    reason: str


def start_when_etcd_answers(participant: Participant, clock: Clock, wait: float, endpoints: str,
                            leaving: Callable[[], bool], beat: Callable[[], None]) -> bool:
    """Register with etcd, retrying while it is unreachable for up to ``wait`` seconds.
    Returns False if a leave was asked for meanwhile. Raises JobFinishedError (the job has an
    outcome), AgentError (etcd stayed away), or whatever registration raised otherwise."""
    deadline = clock.monotonic() + wait
    pause = FIRST_PAUSE
    while True:
        try:
            participant.start()
            return True
        except StoreUnavailableError as exc:
            left = deadline - clock.monotonic()
            if left <= 0:
                raise AgentError(f"etcd at {endpoints} did not answer for {wait:.0f}s (--etcd-wait): {exc}") from exc
            log.warning("waiting for etcd at %s (%s); next try in %.1fs, giving up in %.0fs", endpoints, exc,
                        min(pause, left), left)
        if not _pause(clock, pause, leaving, beat):
            return False
        pause = min(MAX_PAUSE, pause * 2)


def rejoin(participant: Participant, clock: Clock, leaving: Callable[[], bool],
           beat: Callable[[], None]) -> Rejoined | LeaveNow | Finished:
    """After fencing: a new lease and registration once etcd answers again."""
    deadline = clock.monotonic() + REJOIN_TIMEOUT
    pause = FIRST_PAUSE
    while not leaving():
        try:
            participant.rejoin()
            log.info("re-registered with etcd after losing the lease")
            return Rejoined()
        except JobFinishedError as exc:
            return Finished(exc.outcome, exc.reason)
        except StoreConfigError:
            raise  # a certificate expired or a password changed meanwhile: exit 2, name the fix
        except RendezvousError as exc:
            if clock.monotonic() >= deadline:
                raise AgentError(f"etcd unreachable for {REJOIN_TIMEOUT:.0f}s after losing our lease: {exc}") from exc
            log.warning("cannot rejoin yet (%s); retrying in %.1fs", exc, pause)
        if not _pause(clock, pause, leaving, beat):
            break
        pause = min(MAX_PAUSE, pause * 2)
    return LeaveNow()


def _pause(clock: Clock, seconds: float, leaving: Callable[[], bool], beat: Callable[[], None]) -> bool:
    """Sleep in small steps, staying live; False as soon as a leave is asked for."""
    end = clock.monotonic() + seconds
    while clock.monotonic() < end:
        beat()
        if leaving():
            return False
        clock.sleep(min(0.1, max(0.0, end - clock.monotonic())))
    return not leaving()
