"""Applying :func:`rendezvous.protocol.decide.next_step` for a node that waits for an assignment.

The decision is pure; this is the I/O it asks for (join keys, watches, compare-and-swaps),
and the little state the next decision needs: the round this node joined, the round it last
served, the reopen it still owes, and the wait in progress.
"""

from __future__ import annotations

import logging
from typing import Callable

from rendezvous.clock import Clock
from rendezvous.errors import StoreUnavailableError
from rendezvous.protocol import decide
from rendezvous.protocol.coordination import Coordination
from rendezvous.protocol.inbox import Inbox
from rendezvous.protocol.rounds import MemberWatch, open_next_round, open_round_after
from rendezvous.reasons import Reason, reason_text
from rendezvous.settings import Settings
from rendezvous.state import Assignment, JoinRecord, NodeRecord, RoundState
from rendezvous.store import Store

log = logging.getLogger(__name__)


class StepExecutor:
    def __init__(self, store: Store, settings: Settings, node: NodeRecord, inbox: Inbox, member: MemberWatch,
                 clock: Clock, port_reserver: Callable[[], int]) -> None:
        self.store = store
        self.settings = settings
        self.node = node
        self.inbox = inbox
        self.member = member
        self.clock = clock
        self.port_reserver = port_reserver
        self.joined: tuple[int, int] | None = None  # (round, create revision of our join key)
        self.served = 0  # the last round whose assignment was handed out
        self.reopen: decide.Reopen | None = None
        # The wait in progress, kept across calls: a caller may poll with short timeouts.
        self.coordination: Coordination | None = None
        self.waiting_since = 0.0
        self.grow_asked: tuple[int, float] | None = None  # (round, when) we asked to grow it
        self.workers_ready: Callable[[], bool] = lambda: True  # can our workers start at once?
        # May we join now (None) or when to ask again: a node must reach its peers first.
        self.admission: Callable[[RoundState], float | None] = lambda rnd: None

    def begin_wait(self) -> None:
        self.waiting_since = self.clock.monotonic()
        self.restart_coordination()

    def restart_coordination(self) -> None:
        """A fresh one: the old one's watches ended with their phase."""
        self.coordination = Coordination(self.store, self.settings, self.inbox, self.clock)

    def request_reopen(self, after: int, reason: str) -> None:
        """Open the round after ``after`` now if etcd answers; else keep trying on every step."""
        self.reopen = decide.Reopen(after, reason)
        try:
            open_next_round(self.store, self.settings, reason, after)
        except StoreUnavailableError as exc:
            log.warning("could not open the next round yet (%s); will retry", exc)

    def take_step(self, rnd: RoundState, round_rev: int, lease: int) -> Assignment | float | None:
        """The assignment this node now holds, or else when to decide again without an event
        (None: on an event only). ``round_rev`` is ``rnd``'s mod-revision."""
        assert self.coordination is not None, "begin_wait() first"
        self.reopen = decide.outstanding(self.reopen, rnd)
        step = decide.next_step(self._snapshot(rnd))
        if isinstance(step, decide.Join):
            wait = self.admission(rnd)
            if wait is not None:
                return wait
            self._join(step.round, lease)
            step = decide.next_step(self._snapshot(rnd))  # as a joiner now: coordinate or stand by
        match step:
            case decide.Reopen(after=after, why=why):
                open_next_round(self.store, self.settings, why, after)
            case decide.Serve(assignment=assignment):
                self.inbox.end_phase()
                self.coordination = None
                self.served = assignment.round
                return assignment
            case decide.Standby():
                return self._stand_by(rnd, round_rev)
            case decide.Coordinate():
                assert self.joined is not None
                return self.coordination.step(rnd, round_rev, self.joined[1])
        return None

    def _snapshot(self, rnd: RoundState) -> decide.Snapshot:
        joined = self.joined[0] if self.joined is not None else None
        return decide.Snapshot(rnd, self.node.node_id, joined, self.served, self.reopen)

    def _join(self, target: int, lease: int) -> None:
        self.inbox.end_phase()
        node = self.node
        record = JoinRecord(node.node_id, node.addr, node.nproc, self.port_reserver())
        rev = self.store.put(self.settings.joined_key(target, node.node_id), record.encode(), lease=lease)
        if self.joined is not None:
            self.store.delete(self.settings.joined_key(self.joined[0], node.node_id))
        self.joined = (target, rev)
        self.begin_wait()

    def _stand_by(self, rnd: RoundState, round_rev: int) -> float | None:
        """Pre-joined to the round after ``rnd``: watch its group rank 0, and once the world has
        room and our cool-down is over, ask rank 0 to grow the job (it brings every rank to a
        step boundary first); open the next round ourselves if nobody acts on the request."""
        if not self.member.armed and rnd.assignment is not None and rnd.assignment.members:
            self.member.watch(rnd.assignment.members[0].node_id, rnd.number)
        if self.grow_asked is not None and self.grow_asked[0] != rnd.number:
            self.grow_asked = None
        me = self.node.node_id
        now = self.clock.monotonic()
        action = decide.growth_step(rnd, self.settings, self.waiting_since,
                                    self.grow_asked[1] if self.grow_asked else None, now, me,
                                    self.workers_ready())
        if isinstance(action, decide.AskGrowth):
            if self.store.replace(self.settings.round_key, decide.with_grow_request(rnd, me).encode(),
                                  round_rev) is not None:
                log.info("asked round %d's group rank 0 to grow the job", rnd.number)
            self.grow_asked = (rnd.number, now)
            return now + decide.GROW_PATIENCE
        if isinstance(action, decide.OpenGrowth):
            open_round_after(self.store, self.settings, rnd, round_rev,
                             reason_text(Reason.SCALE_UP, f"{me} is waiting"))
            return None
        return action.until
