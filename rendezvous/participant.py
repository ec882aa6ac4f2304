"""One node's side of the rendezvous: join, wait for an assignment, watch, leave.

The participant drives primitives that live in their own modules: the lease
(:mod:`~rendezvous.protocol.session`), the inbox of watch events (:mod:`~rendezvous.protocol.inbox`), the job's
round and status (:mod:`~rendezvous.protocol.job_view`), the steps towards an assignment
(:mod:`~rendezvous.protocol.executor`, deciding by :mod:`~rendezvous.protocol.decide`), closing a round
(:mod:`~rendezvous.protocol.coordination`) and opening the next one (:mod:`~rendezvous.protocol.rounds`);
once in a closed round, what it watches and must act on (:mod:`~rendezvous.protocol.running`).
Store callbacks only enqueue; all processing happens on the caller's thread, so there is
one place where state changes.

Cost per node per round is O(1) in the number of nodes (DESIGN.md section 3): a node watches
the ``round`` key, the ``status`` key, and one other key: the joiner just before it (like
etcd's election), or, while running, the member just before it in rank order. Only the
round's coordinator (its first joiner) reads and watches the whole round.
"""

from __future__ import annotations

import logging
from typing import Callable

from rendezvous.clock import Clock, SystemClock
from rendezvous.errors import (
    LeaseLostError,
    RendezvousError,
    RendezvousTimeoutError,
    StoreUnavailableError,
)
from rendezvous.net import free_port
from rendezvous.protocol import decide
from rendezvous.protocol.executor import StepExecutor
from rendezvous.protocol.inbox import Inbox, InboxItem, ItemKind
from rendezvous.protocol.job_view import JobView
from rendezvous.protocol.leases import NodeLeases, Ticker
from rendezvous.protocol.notices import Notice, PlannedNotices
from rendezvous.protocol.rounds import MemberWatch, PlannedStop, open_next_round
from rendezvous.protocol.running import RunningPhase
from rendezvous.protocol.session import Session
from rendezvous.reasons import Reason, reason_text
from rendezvous.settings import Settings
from rendezvous.state import Assignment, JobStatus, NodeRecord, Outcome, RoundState
from rendezvous.store import Store

log = logging.getLogger(__name__)

TICK = 0.5  # longest a wait goes without calling on_tick


def _master_port() -> int:
    """A port for the worker group's master, in case this node becomes group rank 0: free on
    every interface, as rank 0's workers take peers on whichever one reaches them."""
    return free_port(host="")


class Participant:
    def __init__(self, store: Store, settings: Settings, node: NodeRecord, *,
                 clock: Clock | None = None, port_reserver: Callable[[], int] = _master_port,
                 planned_changes: bool = False, workers_ready: Callable[[], bool] = lambda: True,
                 admission: Callable[[RoundState], float | None] = lambda rnd: None,
                 ticker: Ticker | None = None) -> None:
        """``planned_changes``: the caller handles STOP and GROW notices (notices.PlannedNotices).
        ``workers_ready``: could our workers start at once? A standby grows the job only then.
        ``admission``: may this node join a round now (None), else when to ask again.
        ``ticker``: what refreshes our leases (leases.NodeLeases); None, threads of their own."""
        self.store, self.settings, self.node = store, settings, node
        self._planned = PlannedNotices(planned_changes)
        self.clock = clock or SystemClock()
        self.assignment: Assignment | None = None
        self._inbox = Inbox(store)
        self.leases = NodeLeases(store, settings, node.node_id, self.clock, self._inbox.lease_lost, ticker)
        self._job = JobView(store, settings, self._inbox, self.clock)
        self._member = MemberWatch(store, settings, self._inbox)
        self._running = RunningPhase(store, settings, node.node_id, self.clock, self._inbox, self._job, self._member,
                                     self._planned, self._apply)
        self._steps = StepExecutor(store, settings, node, self._inbox, self._member, self.clock, port_reserver)
        self._steps.workers_ready, self._steps.admission = workers_ready, admission

    @property
    def session(self) -> Session | None:
        """The membership lease: when it is lost, this node's workers must stop."""
        return self.leases.session

    node_id = property(lambda self: self.node.node_id)
    current_round = property(lambda self: self._job.round)

    # --- lifecycle ---------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> None:
        """Take a lease, register this node, read the job's state and start watching it.
        Raises JobFinishedError when the job already has an outcome."""
        session = self.leases.start()
        try:
            self._job.register(session, self.node, timeout)
        except BaseException:
            self.leases.close(revoke=True)
            raise

    def rejoin(self, timeout: float | None = None) -> None:
        """After the lease was lost (fenced): a new lease, registration and watches. If the
        round we ran in is still current, ask for a new one: our workers are gone."""
        if self.assignment is not None:  # kept across failed attempts until the round moves on
            why = reason_text(Reason.NODE_LOST, f"{self.node_id} lost its lease and rejoined")
            self._steps.reopen = decide.Reopen(self.assignment.round, why)
        self.close()
        if self.session is not None:
            try:  # our old keys may outlive the outage (etcd restores leases): drop them now
                self.store.revoke(self.session.lease)
            except RendezvousError:
                pass
        self._steps.joined = self.assignment = None
        self._inbox.clear()
        self.start(timeout)

    def leave(self, reason: str | None = None) -> None:
        """Leave at once: revoke the lease, so nobody waits for it to expire. With a reason,
        and running in a round, first open the next round (recorded as ``node_left``).
        Call from the thread that runs the rendezvous."""
        if self.assignment is not None and reason is not None:
            try:
                self.open_next_round(reason_text(Reason.NODE_LEFT, f"{self.node_id} ({reason})"),
                                     self.assignment.round)
            except RendezvousError as exc:
                log.warning("could not open the next round while leaving: %s", exc)
        self._cancel_all()
        self.leases.close(revoke=True)

    def close(self) -> None:
        """Stop watching and refreshing, without revoking (the lease expires on its own)."""
        self._cancel_all()
        self.leases.close(revoke=False)

    def _cancel_all(self) -> None:
        self._inbox.cancel_all()
        self._steps.coordination = None  # its watches are gone with the phase

    # --- rendezvous --------------------------------------------------------------------
    def next_assignment(self, timeout: float | None = None,
                        on_tick: Callable[[], None] | None = None) -> Assignment:
        """Join the current round (or the next, as a standby) and return once this node is a
        member of a closed round. Raises JobFinishedError, LeaseLostError, RendezvousTimeoutError."""
        session = self.session
        assert session is not None, "start() first"
        deadline = None if timeout is None else self.clock.monotonic() + timeout
        if self.assignment is not None or self._steps.coordination is None:
            self._inbox.end_phase()
            self._steps.begin_wait()
        self.assignment = None
        while True:
            wake: float | None = None
            try:
                if self._job.broken:
                    self._job.resync(session)
                    self._steps.restart_coordination()
                self._take_in(self._inbox.get(0))  # decide on everything already known
                step = self._steps.take_step(self._job.current, self._job.round_rev, session.lease)
                if isinstance(step, Assignment):
                    self.assignment = step
                    return step
                wake = step
            except StoreUnavailableError as exc:
                log.warning("etcd unavailable during rendezvous (%s); re-syncing", exc)
                self._job.broken = True
                wake = self.clock.monotonic() + TICK
            self._wait(wake, deadline, on_tick)
            if deadline is not None and self.clock.monotonic() >= deadline:
                rnd = self._job.round
                raise RendezvousTimeoutError(f"no assignment within {timeout}s (round {rnd.number if rnd else '?'})")

    def _wait(self, wake: float | None, deadline: float | None, on_tick: Callable[[], None] | None) -> None:
        """Until the next event, a decision's deadline, or a tick; then take in what came."""
        now = self.clock.monotonic()
        limit = now + (TICK if on_tick is not None or self._job.broken else 3600.0)
        limit = min([limit, *(t for t in (wake, deadline) if t is not None)])
        self._take_in(self._inbox.get(limit - now))
        if on_tick is not None:
            on_tick()

    def request_new_round(self, reason: str) -> None:
        """Ask for a new round after our current assignment (a local failure, a hang).
        The next :meth:`next_assignment` keeps trying to open it until the round moves on."""
        assert self.assignment is not None
        self._steps.request_reopen(self.assignment.round, reason)

    def open_next_round(self, reason: str, after: int) -> bool:
        """Open round ``after + 1`` unless someone already moved past ``after``."""
        return open_next_round(self.store, self.settings, reason, after)

    # --- running -----------------------------------------------------------------------
    def poll(self, timeout: float) -> Notice | None:
        """While running with ``self.assignment``: wait up to ``timeout`` for something to act on."""
        assert self.assignment is not None and self.session is not None, "next_assignment() first"
        return self._running.poll(self.assignment, self.session, timeout)

    def planned_stop(self) -> PlannedStop:
        """Our part in a planned stop of our round (rounds.PlannedStop)."""
        assert self.assignment is not None
        return PlannedStop(self.store, self.settings, self.assignment.round, self.node_id)

    def _take_in(self, item: InboxItem | None) -> None:
        """Apply ``item`` and everything queued behind it."""
        while item is not None:
            self._apply(item)
            item = self._inbox.get(0)

    def wake(self) -> None:  # end a poll() in progress now: the caller's workers have news
        self._inbox.wake()

    def _apply(self, item: InboxItem) -> None:
        if item.kind is ItemKind.WAKE:
            return
        if item.kind is ItemKind.LEASE_LOST:
            raise LeaseLostError(item.reason)
        if self._inbox.is_stale(item):
            return
        if item.kind in (ItemKind.ROUND, ItemKind.STATUS, ItemKind.WATCH_FAILED):
            self._job.apply(item)
        elif item.kind is ItemKind.MEMBER:
            self._member.apply(item)
        elif self._steps.coordination is not None:  # while running, it ended with its phase
            self._steps.coordination.apply(item)

    # --- outcome -----------------------------------------------------------------------
    def report_done(self) -> bool:
        """Our workers all exited 0 in the current round (job_view.JobView.report_done)."""
        assert self.assignment is not None
        return self._job.report_done(self.node_id, self.assignment)

    def finish(self, outcome: Outcome, reason: str) -> JobStatus:
        """Record the job's outcome once; the first writer wins."""
        return self._job.finish(outcome, reason)
