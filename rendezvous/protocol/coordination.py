"""Closing an open round: who coordinates, and the one transaction that closes it.

Like etcd's election, joiners are ordered by the create-revision of their join keys: each
follows the joiner just before it, so the first joiner coordinates, and when it leaves the
next one takes over on its own key's deletion, with no herd of watchers. Only the coordinator
reads and watches the whole round (its joiners and the live nodes); the decision itself is
:func:`rendezvous.protocol.decide.close_decision`.

A follower also watches its predecessor's presence key (--presence-ttl, 2 s), not only its
join key (held by the membership lease, --lease-ttl, 10 s): a frozen coordinator keeps its join
key for the whole lease, and the round would stall that long. A joiner without presence is
passed over at the election, as the coordinator passes over it when closing. Should it come
back and still act as coordinator, the round's compare-and-swap lets only one close win.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from enum import Enum

from rendezvous.clock import Clock
from rendezvous.protocol import decide, round_members
from rendezvous.protocol.inbox import Inbox, InboxItem, ItemKind
from rendezvous.settings import Settings
from rendezvous.state import JobStatus, JoinRecord, Outcome, RestartCount, RoundState
from rendezvous.store import DELETE, Store

log = logging.getLogger(__name__)


class Role(Enum):
    FOLLOWER = "follower"  # waits for the joiner before it to leave
    COORDINATOR = "coordinator"  # decides when the round closes, and closes it


class Coordination:
    """This node's part in closing one open round, from its join until the phase ends."""

    def __init__(self, store: Store, settings: Settings, inbox: Inbox, clock: Clock) -> None:
        self.store = store
        self.settings = settings
        self.inbox = inbox
        self.clock = clock
        self.role: Role | None = None  # None: not elected yet
        self._joined: dict[str, decide.Joiner] = {}  # by join key
        self._alive: set[str] = set()
        self._last_join_seen = 0.0
        self._previous: tuple[str, ...] = ()

    def step(self, rnd: RoundState, round_rev: int, join_rev: int) -> float | None:
        """Elect (once), and as the coordinator close the round when the rules say so.
        ``round_rev`` is the round record's mod-revision, ``join_rev`` our join key's
        create-revision. Returns when to decide again without an event (None: on one only)."""
        if self.role is None:
            self._elect(rnd.number, join_rev)
        if self.role is not Role.COORDINATOR:
            return None
        rnd = replace(rnd, previous=self._previous)  # not on the round record (round_members)
        view = decide.RoundView(rnd, tuple(self._joined.values()), frozenset(self._alive), self._last_join_seen)
        action = decide.close_decision(view, self.settings, self.clock.monotonic())
        if isinstance(action, decide.Wait):
            return action.until
        self._close(rnd, round_rev, action, view)
        return None

    def _elect(self, number: int, join_rev: int) -> None:
        prefix = self.settings.joined_prefix(number)
        pred = self.store.predecessor(prefix, join_rev)
        while pred is not None:
            record = JoinRecord.decode(pred.key, pred.value)  # following garbage would block the round
            presence_key = self.settings.presence_key(record.node_id)
            presence, presence_rev = self.store.get(presence_key)
            if presence is not None:
                self.role = Role.FOLLOWER
                self.inbox.watch(pred.key, ItemKind.PREDECESSOR, pred.mod_revision + 1)
                self.inbox.watch(presence_key, ItemKind.PREDECESSOR, presence_rev + 1)
                return
            log.info("joiner %s before us is silent (no presence): passing over it", record.node_id)
            pred = self.store.predecessor(prefix, pred.create_revision)
        self.role = Role.COORDINATOR
        self._previous = round_members.previous(self.store, self.settings, number)
        joined, rev = self.store.get_prefix(prefix)
        # "Alive" is present: a member that went silent is not waited for.
        nodes, nodes_rev = self.store.get_prefix(self.settings.presence_prefix)
        self._joined = {kv.key: decide.Joiner(JoinRecord.decode(kv.key, kv.value), kv.create_revision)
                        for kv in joined}
        self._alive = {kv.key.rsplit("/", 1)[-1] for kv in nodes}
        self._last_join_seen = self.clock.monotonic()
        self.inbox.watch(prefix, ItemKind.JOINED, rev + 1, prefix=True)
        self.inbox.watch(self.settings.presence_prefix, ItemKind.NODES, nodes_rev + 1, prefix=True)

    def _close(self, rnd: RoundState, round_rev: int, action: decide.Close, view: decide.RoundView) -> None:
        """Write the assignment by compare-and-swap, charging the restart budget in the same
        transaction when the round was opened by a worker failure."""
        s = self.settings
        restarts_kv, _ = self.store.get(s.restarts_key)
        used = RestartCount.decode(restarts_kv.key, restarts_kv.value) if restarts_kv else RestartCount(0)
        charge = decide.charge_decision(rnd, frozenset(j.node_id for j in view.joined), used.count,
                                        s.max_restarts)
        compares = [(s.round_key, round_rev),
                    (s.restarts_key, restarts_kv.mod_revision if restarts_kv else 0),
                    (s.status_key, 0)]  # an outcome, once recorded, is final
        closing = [(s.round_key, action.round.encode()),
                   (s.members_key(rnd.number), action.round.encode_members())]
        if charge.exhausted:
            puts = [(s.status_key, JobStatus(Outcome.FAILED, charge.why).encode())]
        elif charge.consume:
            puts = [*closing, (s.restarts_key, RestartCount(used.count + 1, rnd.reason).encode())]
        else:
            puts = closing
        if self.store.commit(compares, puts).succeeded:
            log.info("round %d closed (%s; %s): %s", rnd.number, action.why, charge.why,
                     ", ".join(action.round.assignment.node_ids) if action.round.assignment else "-")
            if rnd.number > 1:  # the previous round's join and done keys are history now
                self.store.delete_prefix(s.round_prefix(rnd.number - 1))

    def apply(self, item: InboxItem) -> None:
        """An event of this phase's watches (the caller has dropped stale ones)."""
        if item.kind is ItemKind.PREDECESSOR:
            if any(ev.kind == DELETE for ev in item.events):
                self.role = None  # the joiner before us left or went silent: maybe we coordinate now
                self.inbox.end_phase()
        elif item.kind is ItemKind.JOINED:
            for ev in item.events:
                if ev.kind == DELETE:
                    self._joined.pop(ev.key, None)
                    continue
                if ev.key not in self._joined:
                    self._last_join_seen = self.clock.monotonic()
                self._joined[ev.key] = decide.Joiner(JoinRecord.decode(ev.key, ev.value), ev.create_revision)
        elif item.kind is ItemKind.NODES:
            for ev in item.events:
                node_id = ev.key.rsplit("/", 1)[-1]
                if ev.kind == DELETE:
                    self._alive.discard(node_id)
                else:
                    self._alive.add(node_id)
