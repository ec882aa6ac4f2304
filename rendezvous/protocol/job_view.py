"""The job's ``round`` and ``status`` keys as one node last read them.

Read in one transaction (with this node's registration, the first time), then kept current by
two watches that start just after the revision read, so no change between the read and the
watch is missed. When a watch fails, the view is marked broken and re-read before it is
trusted again.
"""

from __future__ import annotations

import logging

from rendezvous.clock import Clock
from rendezvous.errors import (
    CorruptStateError,
    JobFinishedError,
    LeaseLostError,
    RendezvousError,
    StoreUnavailableError,
)
from rendezvous.protocol import decide, round_members
from rendezvous.protocol.inbox import Inbox, InboxItem, ItemKind
from rendezvous.protocol.session import Session
from rendezvous.settings import Settings
from rendezvous.state import Assignment, JobStatus, NodeRecord, Outcome, RoundState
from rendezvous.store import DELETE, KV, Event, Store

log = logging.getLogger(__name__)

RESYNC_PAUSE = 0.5  # between re-reads while etcd does not answer
REGISTER_PAUSE = 0.25  # between tries to take over a node key an earlier agent left behind


class JobView:
    def __init__(self, store: Store, settings: Settings, inbox: Inbox, clock: Clock) -> None:
        self.store = store
        self.settings = settings
        self.inbox = inbox
        self.clock = clock
        self.round: RoundState | None = None
        self.round_rev = 0  # mod-revision of that round record: what our swaps compare
        self.broken = False  # a watch failed: re-read before trusting the round
        self._status: JobStatus | None = None

    @property
    def current(self) -> RoundState:
        assert self.round is not None, "register() first"
        return self.round

    def register(self, session: Session, node: NodeRecord, timeout: float | None) -> None:
        """Create ``nodes/<id>`` on the session's lease and read ``round`` and ``status`` in the
        same transaction, then watch them. A key left by an earlier agent of the same id is
        waited out (it expires within the TTL); a live one is an error. Raises JobFinishedError
        when the job already has an outcome."""
        s = self.settings
        key = s.node_key(node.node_id)
        wait = s.lease_ttl + 1 if timeout is None else timeout
        deadline = self.clock.monotonic() + wait
        while True:
            result = self.store.commit([(key, 0)], [(key, node.encode())], lease=session.lease,
                                       reads=(s.round_key, s.status_key, key))
            round_kv, status_kv, ours = result.reads
            _raise_if_finished(status_kv)
            # A retry after a reply was lost finds the key already there, on our own lease:
            # that is our own registration, not a live agent of the same id.
            if result.succeeded or (ours is not None and ours.lease == session.lease):
                break
            if self.clock.monotonic() >= deadline:
                raise RendezvousError(
                    f"node id {node.node_id!r} is already registered in job {s.job_id!r} "
                    f"by a live agent (waited {wait:.0f}s); give this node another --node-id")
            self.clock.sleep(REGISTER_PAUSE)
        if round_kv is None:
            round_kv = self.store.get_or_create(s.round_key, decide.first_round().encode())
        self._set_round(round_kv)
        self._watch(max(result.revision, round_kv.mod_revision))

    def resync(self, session: Session) -> None:
        """Cancel every watch (the inbox's phase ends too), re-read and re-watch. Bounded by
        the lease: raises LeaseLostError once the session has given up on it."""
        s = self.settings
        while True:
            try:
                self.inbox.cancel_all()
                result = self.store.commit([], [], reads=(s.round_key, s.status_key))
                round_kv, status_kv = result.reads
                _raise_if_finished(status_kv)
                self._set_round(round_kv)
                self._watch(result.revision)
                return
            except StoreUnavailableError as exc:
                if session.lost.is_set():
                    raise LeaseLostError(session.lost_reason) from exc
                log.warning("etcd unavailable while re-syncing (%s); retrying", exc)
                self.clock.sleep(RESYNC_PAUSE)

    def report_done(self, node_id: str, assignment: Assignment) -> bool:
        """This node's workers all exited 0 in ``assignment``'s round; the member that sees
        every member done records the job's success. Returns whether it did."""
        prefix = self.settings.done_prefix(assignment.round)
        self.store.put(f"{prefix}{node_id}", b"1")
        if self.store.count_prefix(prefix) < len(assignment.members):
            return False
        self.finish(Outcome.SUCCEEDED,
                    f"all {len(assignment.members)} nodes' workers exited 0 in round {assignment.round}")
        return True

    def finish(self, outcome: Outcome, reason: str) -> JobStatus:
        """Record the job's outcome once; the first writer wins. Returns the recorded outcome."""
        kv = self.store.get_or_create(self.settings.status_key, JobStatus(outcome, reason).encode())
        return JobStatus.decode(kv.key, kv.value)

    def apply(self, item: InboxItem) -> None:
        """A round, status or watch-failure item (the caller has dropped stale ones)."""
        if item.kind is ItemKind.WATCH_FAILED:
            log.warning("watch lost (%s); re-reading state", item.error)
            self.broken = True
        elif item.kind is ItemKind.ROUND:
            for ev in item.events:
                self._set_round(None if ev.kind == DELETE else ev)
        elif item.kind is ItemKind.STATUS:
            for ev in item.events:
                if ev.kind != DELETE:
                    self._status = JobStatus.decode(ev.key, ev.value)
            if self._status is not None:
                raise JobFinishedError(self._status.outcome, self._status.reason)

    def _watch(self, revision: int) -> None:
        self.inbox.watch(self.settings.round_key, ItemKind.ROUND, revision + 1)
        self.inbox.watch(self.settings.status_key, ItemKind.STATUS, revision + 1)
        self.broken = False

    def _set_round(self, kv: KV | Event | None) -> None:
        if kv is None:
            raise CorruptStateError(self.settings.round_key, "a round record", "the key deleted")
        if kv.mod_revision < self.round_rev:  # read past already (round_members.load re-reads)
            return
        known = self.round.assignment if self.round is not None else None
        self.round, self.round_rev = round_members.load(self.store, self.settings, kv, known)


def _raise_if_finished(status_kv: KV | None) -> None:
    if status_kv is not None:
        status = JobStatus.decode(status_kv.key, status_kv.value)
        raise JobFinishedError(status.outcome, status.reason)
