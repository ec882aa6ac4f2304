"""One node's side of the rendezvous: join, wait for an assignment, watch, leave.

The participant does I/O and bookkeeping; every decision comes from :mod:`rendezvous.decide`.
Watch callbacks only enqueue; all processing happens on the caller's thread, so there is
one place where state changes.

Cost per node per round is O(1) in the number of nodes (DESIGN.md section 3): a node watches
the ``round`` key, the ``status`` key, and one other key: the joiner just before it (like
etcd's election), or, while running, the member just before it in rank order. Only the
round's coordinator (its first joiner) reads and watches the whole round.
"""

from __future__ import annotations

import logging
import queue
import socket
from dataclasses import dataclass
from typing import Any, Callable

from rendezvous import decide
from rendezvous.clock import Clock, SystemClock
from rendezvous.errors import (
    CorruptStateError,
    JobFinishedError,
    LeaseLostError,
    RendezvousError,
    RendezvousTimeoutError,
    StoreUnavailableError,
)
from rendezvous.session import Session
from rendezvous.settings import Settings
from rendezvous.state import (
    FAILED,
    SUCCEEDED,
    Assignment,
    JobStatus,
    JoinRecord,
    NodeRecord,
    RestartCount,
    RoundState,
)
from rendezvous.store import DELETE, KV, Event, Store

log = logging.getLogger(__name__)

TICK = 0.5  # longest a wait goes without calling on_tick
_PHASE_TAGS = frozenset({"pred", "joined", "nodes", "member"})


def reserve_port() -> int:
    """A port free on this host now, for the worker group's master if this node is rank 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Notice:
    """Something a running node must act on."""

    kind: str  # "round": the round moved on; "finished": the job has an outcome; "lease_lost"
    detail: str
    round: RoundState | None = None
    status: JobStatus | None = None


class _Phase:
    """Watches that belong to one phase (coordinating a round, or running); cancelled together.
    Events already queued from a cancelled watch are recognised by the phase generation."""

    def __init__(self) -> None:
        self.watches: list[Any] = []
        self.gen = 0

    def cancel(self) -> None:
        for w in self.watches:
            try:
                w.cancel()
            except RendezvousError:
                pass
        self.watches.clear()
        self.gen += 1


class Participant:
    def __init__(self, store: Store, settings: Settings, node: NodeRecord, *,
                 clock: Clock | None = None, port_reserver: Callable[[], int] = reserve_port) -> None:
        self.store = store
        self.settings = settings
        self.node = node
        self.clock = clock or SystemClock()
        self.port_reserver = port_reserver
        self.session: Session | None = None
        self._q: queue.Queue[tuple[str, int, Any]] = queue.Queue()
        self._gen = 0  # watch generation: items from cancelled watches are ignored
        self._round: RoundState | None = None
        self._round_rev = 0  # mod-revision of the round record we hold
        self._status: JobStatus | None = None
        self._base: list[Any] = []  # the round and status watches
        self._phase = _Phase()
        self._broken = False
        self.assignment: Assignment | None = None
        self._joined: tuple[int, int] | None = None  # (round, create revision of our join key)
        self._member_watch_for: str | None = None
        self._member_watch_round = 0
        self._reopen: tuple[int, str] | None = None  # (round to move past, why)
        self._served = 0  # the last round whose assignment next_assignment returned
        self._waiting: _Coordination | None = None  # the wait in progress, kept across calls

    @property
    def node_id(self) -> str:
        return self.node.node_id

    @property
    def current_round(self) -> RoundState | None:
        return self._round

    # --- lifecycle ---------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> None:
        """Take a lease, register this node, read the job's state and start watching it.
        Raises JobFinishedError when the job already has an outcome."""
        self._open_session()
        try:
            rev = self._register(timeout)
        except BaseException:
            self.session.revoke() if self.session else None
            raise
        self._watch_base(rev)

    def _open_session(self) -> None:
        # A request may block for the store's retry time; the lease is declared lost that much
        # (and half a second) early, so fencing still happens within the TTL.
        margin = getattr(self.store, "retry_for", 0.0) + 0.5
        self.session = Session(self.store, self.settings.lease_ttl, self.clock, margin=margin,
                               on_lost=lambda reason: self._q.put(("lost", -1, reason))).start()

    def _register(self, timeout: float | None) -> int:
        """Create ``nodes/<id>`` on our lease and read ``round`` and ``status`` in the same
        transaction. A key left by an earlier agent of the same id is waited out (it expires
        within the TTL); a live one is an error. Returns the revision read at."""
        assert self.session is not None
        s = self.settings
        key = s.node_key(self.node_id)
        wait = s.lease_ttl + 1 if timeout is None else timeout
        deadline = self.clock.monotonic() + wait
        while True:
            result = self.store.commit([(key, 0)], [(key, self.node.encode())], lease=self.session.lease,
                                       reads=(s.round_key, s.status_key))
            round_kv, status_kv = result.reads
            if status_kv is not None:
                status = JobStatus.decode(status_kv.key, status_kv.value)
                raise JobFinishedError(status.outcome, status.reason)
            if result.succeeded:
                break
            if self.clock.monotonic() >= deadline:
                raise RendezvousError(
                    f"node id {self.node_id!r} is already registered in job {s.job_id!r} "
                    f"by a live agent (waited {wait:.0f}s); give this node another --node-id"
                )
            self.clock.sleep(0.25)
        if round_kv is None:
            round_kv = self.store.get_or_create(s.round_key, decide.first_round().encode())
        self._set_round(round_kv)
        return max(result.revision, round_kv.mod_revision)

    def _watch_base(self, rev: int) -> None:
        gen = self._gen
        self._base = [
            self._watch(self.settings.round_key, "round", gen, rev + 1),
            self._watch(self.settings.status_key, "status", gen, rev + 1),
        ]
        self._broken = False

    def rejoin(self, timeout: float | None = None) -> None:
        """After the lease was lost (fenced): a new lease, registration and watches. If the
        round we ran in is still current, ask for a new one: our workers are gone."""
        if self.assignment is not None:  # kept across failed attempts until the round moves on
            self._reopen = (self.assignment.round, f"node_lost: {self.node_id} lost its lease and rejoined")
        self._cancel_all()
        if self.session is not None:
            self.session.close()
            try:  # our old keys may outlive the outage (etcd restores leases): drop them now
                self.store.revoke(self.session.lease)
            except RendezvousError:
                pass
        self._joined = None
        self.assignment = None
        self._drain_queue()
        self.start(timeout)

    def leave(self, reason: str | None = None) -> None:
        """Leave at once: revoke the lease, so nobody waits for it to expire. With a reason,
        and running in a round, first open the next round (recorded as ``node_left``).
        Call from the thread that runs the rendezvous."""
        if self.assignment is not None and reason is not None:
            try:
                self.open_next_round(f"node_left: {self.node_id} ({reason})", self.assignment.round)
            except RendezvousError as exc:
                log.warning("could not open the next round while leaving: %s", exc)
        self._cancel_all()
        if self.session is not None:
            self.session.revoke()

    def close(self) -> None:
        """Stop watching and refreshing, without revoking (the lease expires on its own)."""
        self._cancel_all()
        if self.session is not None:
            self.session.close()

    def _cancel_all(self) -> None:
        self._phase.cancel()
        self._waiting = None  # its watches are gone with the phase
        for w in self._base:
            try:
                w.cancel()
            except RendezvousError:
                pass
        self._base = []
        self._gen += 1

    # --- watching ----------------------------------------------------------------------
    def _watch(self, key: str, tag: str, gen: int, start: int, prefix: bool = False) -> Any:
        if tag in _PHASE_TAGS:  # phase events carry the phase generation with them
            phase_gen = self._phase.gen
            on_events = lambda events: self._q.put((tag, gen, (phase_gen, events)))  # noqa: E731
        else:
            on_events = lambda events: self._q.put((tag, gen, events))  # noqa: E731
        return self.store.watch(key, on_events, lambda exc: self._q.put(("error", gen, exc)),
                                start, prefix=prefix)

    def _drain_queue(self) -> None:
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                return

    def _next_item(self, timeout: float) -> tuple[str, int, Any] | None:
        try:
            return self._q.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def _set_round(self, kv: KV | None) -> None:
        if kv is None:
            raise CorruptStateError(self.settings.round_key, "a round record", "the key deleted")
        self._round = RoundState.decode(kv.key, kv.value)
        self._round_rev = kv.mod_revision

    def _apply_common(self, tag: str, gen: int, payload: Any) -> bool:
        """Items every phase handles. Returns True when the item was consumed here."""
        if tag == "lost":
            raise LeaseLostError(payload)
        if gen != self._gen and tag != "lost":
            return True  # from a watch we already cancelled
        if tag in _PHASE_TAGS and payload[0] != self._phase.gen:
            return True  # from a phase we already left
        if tag in _PHASE_TAGS:
            return False
        if tag == "error":
            log.warning("watch lost (%s); re-reading state", payload)
            self._broken = True
            return True
        if tag == "round":
            for ev in payload:
                if ev.kind == DELETE:
                    raise CorruptStateError(self.settings.round_key, "a round record", "the key deleted")
                self._round = RoundState.decode(ev.key, ev.value)
                self._round_rev = ev.mod_revision
            return True
        if tag == "status":
            for ev in payload:
                if ev.kind != DELETE:
                    self._status = JobStatus.decode(ev.key, ev.value)
            if self._status is not None:
                raise JobFinishedError(self._status.outcome, self._status.reason)
            return True
        return False

    def _resync(self) -> None:
        """Re-read and re-watch after a broken watch; bounded by the lease's deadline."""
        assert self.session is not None
        s = self.settings
        while True:
            try:
                self._cancel_all()
                result = self.store.commit([], [], reads=(s.round_key, s.status_key))
                round_kv, status_kv = result.reads
                if status_kv is not None:
                    status = JobStatus.decode(status_kv.key, status_kv.value)
                    raise JobFinishedError(status.outcome, status.reason)
                self._set_round(round_kv)
                self._watch_base(result.revision)
                return
            except StoreUnavailableError as exc:
                if self.session.lost.is_set():
                    raise LeaseLostError(self.session.lost_reason) from exc
                log.warning("etcd unavailable while re-syncing (%s); retrying", exc)
                self.clock.sleep(TICK)

    # --- rendezvous --------------------------------------------------------------------
    def next_assignment(self, timeout: float | None = None,
                        on_tick: Callable[[], None] | None = None) -> Assignment:
        """Join the current round (or the next, as a standby) and return once this node is a
        member of a closed round. Raises JobFinishedError, LeaseLostError, RendezvousTimeoutError."""
        assert self.session is not None, "start() first"
        deadline = None if timeout is None else self.clock.monotonic() + timeout
        # A caller may poll with short timeouts: a wait in the same round carries on where the
        # last call left it (the coordinator's view, its last call, a standby's cool-down).
        if self.assignment is not None or self._waiting is None:
            self._phase.cancel()
            self._waiting = _Coordination(self.clock.monotonic())
        self.assignment = None
        self._member_watch_for = None
        coord = self._waiting
        waiting_since = coord.since
        while True:
            wake: float | None = None
            try:
                if self._broken:
                    self._resync()
                    coord = self._waiting = _Coordination(coord.since)
                item = self._next_item(0)  # decide on everything already known
                while item is not None:
                    self._apply(item, coord)
                    item = self._next_item(0)
                rnd = self._round
                assert rnd is not None
                if self._reopen is not None and rnd.number > self._reopen[0]:
                    self._reopen = None
                if self._reopen is not None:
                    if not rnd.is_open:
                        self.open_next_round(self._reopen[1], self._reopen[0])
                elif not rnd.is_open and rnd.number <= self._served:
                    pass  # we already hold this round: wait for the next one to open
                else:
                    target = self._target(rnd)
                    if self._joined is None or self._joined[0] != target:
                        self._join(target)
                        coord = self._waiting = _Coordination(self.clock.monotonic())
                        waiting_since = coord.since
                    if not rnd.is_open and rnd.number == target:
                        assert rnd.assignment is not None
                        self._phase.cancel()
                        self._waiting = None
                        self.assignment = rnd.assignment
                        self._served = rnd.number
                        self._member_watch_for = None  # poll() sets up the running watch
                        return rnd.assignment
                    if not rnd.is_open:  # pre-joined, we wait for the round after a closed one
                        self._watch_as_standby(rnd, coord)
                        wake = self._maybe_scale_up(rnd, waiting_since)
                    else:
                        wake = self._coordinate(rnd, coord)
            except StoreUnavailableError as exc:
                log.warning("etcd unavailable during rendezvous (%s); re-syncing", exc)
                self._broken = True
                wake = self.clock.monotonic() + TICK
            # Wait for the next event, a decision's deadline, or a tick.
            now = self.clock.monotonic()
            limit = now + (TICK if on_tick is not None or self._broken else 3600.0)
            for t in (wake, deadline):
                if t is not None:
                    limit = min(limit, t)
            item = self._next_item(limit - now)
            while item is not None:
                self._apply(item, coord)
                item = self._next_item(0)
            if on_tick is not None:
                on_tick()
            if deadline is not None and self.clock.monotonic() >= deadline:
                raise RendezvousTimeoutError(
                    f"no assignment within {timeout}s (round {self._round.number if self._round else '?'})"
                )

    def _target(self, rnd: RoundState) -> int:
        """The round this node should be in: an open one; a closed one we joined and are a
        member of; otherwise the one after (as a standby or newcomer)."""
        if rnd.is_open:
            return rnd.number
        joined_this = self._joined is not None and self._joined[0] == rnd.number
        if joined_this and rnd.assignment is not None and self.node_id in rnd.assignment.node_ids:
            return rnd.number
        return rnd.number + 1

    def _watch_as_standby(self, rnd: RoundState, coord: _Coordination) -> None:
        """A waiting node watches the closed round's group rank 0: the ring of members covers
        every other loss, but not that of a lone member (or of every member at once)."""
        if coord.standby_watch or rnd.assignment is None or not rnd.assignment.members:
            return
        coord.standby_watch = True
        first = rnd.assignment.members[0].node_id
        self._member_watch_for = first
        self._member_watch_round = rnd.number
        kv, rev = self.store.get(self.settings.node_key(first))
        if kv is None:
            self.open_next_round(f"node_lost: {first}", rnd.number)
            return
        self._phase.watches.append(self._watch(self.settings.node_key(first), "member", self._gen, rev + 1))

    def _maybe_scale_up(self, rnd: RoundState, waiting_since: float) -> float | None:
        verdict = decide.should_scale_up(rnd, self.settings, waiting_since, self.clock.monotonic())
        if verdict is True:
            reason = f"scale_up: {self.node_id} is waiting"
            if self.store.replace(self.settings.round_key, decide.next_round(rnd, reason).encode(),
                                  self._round_rev) is not None:
                log.info("opened round %d: %s", rnd.number + 1, reason)
            return None
        return verdict.until

    def request_new_round(self, reason: str) -> None:
        """Ask for a new round after our current assignment (a local failure, a hang).
        The next :meth:`next_assignment` keeps trying to open it until the round moves on."""
        assert self.assignment is not None
        self._reopen = (self.assignment.round, reason)
        try:
            self.open_next_round(reason, self.assignment.round)
        except StoreUnavailableError as exc:
            log.warning("could not open the next round yet (%s); will retry", exc)

    def _join(self, target: int) -> None:
        assert self.session is not None
        self._phase.cancel()
        record = JoinRecord(self.node_id, self.node.addr, self.node.nproc, self.port_reserver())
        rev = self.store.put(self.settings.joined_key(target, self.node_id), record.encode(),
                             lease=self.session.lease)
        if self._joined is not None:
            self.store.delete(self.settings.joined_key(self._joined[0], self.node_id))
        self._joined = (target, rev)

    def _coordinate(self, rnd: RoundState, coord: _Coordination) -> float | None:
        """Follow the joiner before us; if there is none we coordinate: decide and close."""
        assert self._joined is not None
        prefix = self.settings.joined_prefix(rnd.number)
        if coord.role is None:
            pred = self.store.predecessor(prefix, self._joined[1])
            if pred is not None:
                JoinRecord.decode(pred.key, pred.value)  # following garbage would block the round
                coord.role = "follower"
                self._phase.watches.append(self._watch(pred.key, "pred", self._gen, pred.mod_revision + 1))
                return None
            coord.role = "coordinator"
            joined, rev = self.store.get_prefix(prefix)
            nodes, nrev = self.store.get_prefix(self.settings.nodes_prefix)
            now = self.clock.monotonic()
            coord.joined = {kv.key: decide.Joiner(JoinRecord.decode(kv.key, kv.value), kv.create_revision)
                            for kv in joined}
            coord.alive = {kv.key.rsplit("/", 1)[-1] for kv in nodes}
            coord.last_join_seen = now
            self._phase.watches.append(self._watch(prefix, "joined", self._gen, rev + 1, prefix=True))
            self._phase.watches.append(
                self._watch(self.settings.nodes_prefix, "nodes", self._gen, nrev + 1, prefix=True))
        if coord.role != "coordinator":
            return None
        view = decide.RoundView(rnd, tuple(coord.joined.values()), frozenset(coord.alive), coord.last_join_seen)
        action = decide.close_decision(view, self.settings, self.clock.monotonic())
        if isinstance(action, decide.Wait):
            return action.until
        self._close(rnd, action, view)
        return None

    def _close(self, rnd: RoundState, action: decide.Close, view: decide.RoundView) -> None:
        """Write the assignment by compare-and-swap, charging the restart budget in the same
        transaction when the round was opened by a worker failure."""
        restarts_kv, _ = self.store.get(self.settings.restarts_key)
        used = RestartCount.decode(restarts_kv.key, restarts_kv.value) if restarts_kv else RestartCount(0)
        charge = decide.charge_decision(rnd, frozenset(j.node_id for j in view.joined), used.count,
                                        self.settings.max_restarts)
        compares = [(self.settings.round_key, self._round_rev),
                    (self.settings.restarts_key, restarts_kv.mod_revision if restarts_kv else 0),
                    (self.settings.status_key, 0)]  # an outcome, once recorded, is final
        if charge.exhausted:
            puts = [(self.settings.status_key, JobStatus(FAILED, charge.why).encode())]
        elif charge.consume:
            puts = [(self.settings.round_key, action.round.encode()),
                    (self.settings.restarts_key, RestartCount(used.count + 1, rnd.reason).encode())]
        else:
            puts = [(self.settings.round_key, action.round.encode())]
        if self.store.commit(compares, puts).succeeded:
            log.info("round %d closed (%s; %s): %s", rnd.number, action.why, charge.why,
                     ", ".join(action.round.assignment.node_ids) if action.round.assignment else "-")
            if rnd.number > 1:  # the previous round's join and done keys are history now
                self.store.delete_prefix(self.settings.round_prefix(rnd.number - 1))

    def _apply(self, item: tuple[str, int, Any], coord: _Coordination) -> None:
        tag, gen, payload = item
        if self._apply_common(tag, gen, payload):
            return
        events: list[Event] = payload[1]
        if tag == "pred":
            if any(ev.kind == DELETE for ev in events):
                coord.role = None  # the joiner before us left: maybe we coordinate now
                self._phase.cancel()
        elif tag == "joined":
            for ev in events:
                if ev.kind == DELETE:
                    coord.joined.pop(ev.key, None)
                else:
                    if ev.key not in coord.joined:
                        coord.last_join_seen = self.clock.monotonic()
                    coord.joined[ev.key] = decide.Joiner(JoinRecord.decode(ev.key, ev.value), ev.create_revision)
        elif tag == "nodes":
            for ev in events:
                node_id = ev.key.rsplit("/", 1)[-1]
                if ev.kind == DELETE:
                    coord.alive.discard(node_id)
                else:
                    coord.alive.add(node_id)
        elif tag == "member":
            if any(ev.kind == DELETE for ev in events):
                lost, after = self._member_watch_for, self._member_watch_round
                log.warning("member %s lost its lease; opening round %d", lost, after + 1)
                self.open_next_round(f"node_lost: {lost}", after)

    # --- running -----------------------------------------------------------------------
    def poll(self, timeout: float) -> Notice | None:
        """While running with ``self.assignment``: wait up to ``timeout`` for something to act on."""
        assert self.assignment is not None, "next_assignment() first"
        deadline = self.clock.monotonic() + timeout
        while True:
            try:
                if self._broken:
                    self._resync()
                    self._member_watch_for = None
                if self._member_watch_for is None:
                    self._watch_member()
                notice = self._round_notice()
                if notice is not None:
                    return notice
                item = self._next_item(deadline - self.clock.monotonic())
                if item is None:
                    return None
                self._apply(item, _Coordination())
            except JobFinishedError as exc:
                return Notice("finished", str(exc), status=JobStatus(exc.outcome, exc.reason))
            except LeaseLostError as exc:
                return Notice("lease_lost", str(exc))
            except StoreUnavailableError as exc:
                # A short outage restarts nothing: re-sync until etcd answers or the lease is lost.
                log.warning("etcd unavailable while running (%s); re-syncing", exc)
                self._broken = True
                if self.clock.monotonic() >= deadline:
                    return None

    def _round_notice(self) -> Notice | None:
        rnd = self._round
        assert rnd is not None and self.assignment is not None
        if rnd.number != self.assignment.round or rnd.is_open:
            return Notice("round", rnd.reason or f"round {rnd.number}", round=rnd)
        return None

    def _watch_member(self) -> None:
        """Watch the member before us in rank order: each loss is noticed by one node at once."""
        assert self.assignment is not None
        pred = decide.ring_predecessor(self.assignment, self.node_id)
        self._member_watch_for = pred or ""
        self._member_watch_round = self.assignment.round
        if pred is None:
            return
        kv, rev = self.store.get(self.settings.node_key(pred))
        if kv is None:
            self.open_next_round(f"node_lost: {pred}", self.assignment.round)
            return
        self._phase.watches.append(self._watch(self.settings.node_key(pred), "member", self._gen, rev + 1))

    def open_next_round(self, reason: str, after: int) -> bool:
        """Open round ``after + 1`` unless someone already moved past ``after``. The round key
        is read fresh, so a stale view never overwrites a newer decision."""
        kv, _ = self.store.get(self.settings.round_key)
        if kv is None:
            return False
        current = RoundState.decode(kv.key, kv.value)
        if current.number != after or current.is_open:
            return False
        opened = self.store.replace(self.settings.round_key, decide.next_round(current, reason).encode(),
                                    kv.mod_revision) is not None
        if opened:
            log.info("opened round %d: %s", after + 1, reason)
        return opened

    # --- outcome -----------------------------------------------------------------------
    def report_done(self) -> bool:
        """Our workers all exited 0 in the current round. When every member has said so, the
        job is marked succeeded (each member checks after writing, so the last one sees all)."""
        assert self.assignment is not None
        n = self.assignment.round
        self.store.put(f"{self.settings.done_prefix(n)}{self.node_id}", b"1")
        if self.store.count_prefix(self.settings.done_prefix(n)) >= len(self.assignment.members):
            self.finish(SUCCEEDED, f"all {len(self.assignment.members)} nodes' workers exited 0 in round {n}")
            return True
        return False

    def finish(self, outcome: str, reason: str) -> JobStatus:
        """Record the job's outcome once; the first writer wins. Returns the recorded outcome."""
        kv = self.store.get_or_create(self.settings.status_key, JobStatus(outcome, reason).encode())
        return JobStatus.decode(kv.key, kv.value)


class _Coordination:
    """What this node knows about the round it waits in."""

    def __init__(self, since: float = 0.0) -> None:
        self.since = since  # when this node began to wait in this round
        self.role: str | None = None  # None: not yet determined; "follower"; "coordinator"
        self.standby_watch = False  # waiting after a closed round: watching its group rank 0
        self.joined: dict[str, decide.Joiner] = {}
        self.alive: set[str] = set()
        self.last_join_seen = 0.0
