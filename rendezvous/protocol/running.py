"""A node's life in a closed round: what it watches and what it must act on.

Until :meth:`Participant.next_assignment` returns, the steps towards an assignment are the
executor's (:mod:`~rendezvous.protocol.executor`). After it, the node runs, and this is the
other half: it watches the member just before it in rank order (a ring, so O(1) watches per
node), the ``round`` and ``status`` keys, and turns their events into one :class:`Notice` for
the caller (a new round, a planned stop or grow, the job's end, a lost lease). A short etcd
outage restarts nothing: the view re-syncs until etcd answers or the lease is lost.
"""

from __future__ import annotations

import logging
from typing import Callable

from rendezvous.clock import Clock
from rendezvous.errors import JobFinishedError, LeaseLostError, StoreUnavailableError
from rendezvous.protocol import decide
from rendezvous.protocol.inbox import Inbox, InboxItem, ItemKind
from rendezvous.protocol.job_view import JobView
from rendezvous.protocol.notices import Notice, NoticeKind, PlannedNotices
from rendezvous.protocol.rounds import MemberWatch, open_next_round
from rendezvous.protocol.session import Session
from rendezvous.reasons import Reason, reason_text
from rendezvous.settings import Settings
from rendezvous.state import Assignment, JobStatus
from rendezvous.store import Store

log = logging.getLogger("rendezvous.participant")


class RunningPhase:
    """The running half of one node's participant. ``apply`` routes an event to whoever owns it
    (the participant's one dispatcher, so state changes in one place)."""

    def __init__(self, store: Store, settings: Settings, node_id: str, clock: Clock, inbox: Inbox, job: JobView,
                 member: MemberWatch, planned: PlannedNotices, apply: Callable[[InboxItem], None]) -> None:
        self.store, self.settings, self.node_id, self.clock = store, settings, node_id, clock
        self._inbox, self._job, self._member, self._planned, self._apply = inbox, job, member, planned, apply

    def poll(self, assignment: Assignment, session: Session, timeout: float) -> Notice | None:
        """Wait up to ``timeout`` for something to act on while running in ``assignment``."""
        deadline = self.clock.monotonic() + timeout
        while True:
            try:
                if self._job.broken:
                    self._job.resync(session)
                if not self._member.armed:  # each member watches the one before it in rank order
                    self._member.watch(decide.ring_predecessor(assignment, self.node_id), assignment.round)
                notice, grow_now = self._planned.running(self._job.current, assignment, self.node_id)
                if grow_now:
                    why = reason_text(Reason.SCALE_UP, f"{grow_now} is waiting")
                    open_next_round(self.store, self.settings, why, assignment.round)
                if notice is not None:
                    return notice
                item = self._inbox.get(deadline - self.clock.monotonic())
                if item is None or item.kind is ItemKind.WAKE:
                    return None
                self._apply(item)
            except JobFinishedError as exc:
                return Notice(NoticeKind.FINISHED, str(exc), status=JobStatus(exc.outcome, exc.reason))
            except LeaseLostError as exc:
                return Notice(NoticeKind.LEASE_LOST, str(exc))
            except StoreUnavailableError as exc:
                # A short outage restarts nothing: re-sync until etcd answers or the lease is lost.
                log.warning("etcd unavailable while running (%s); re-syncing", exc)
                self._job.broken = True
                if self.clock.monotonic() >= deadline:
                    return None
