"""Rendezvous decisions: pure functions of (snapshot, settings, now) -> action.

Nothing here reads a clock, talks to etcd or sleeps; the participant gathers a snapshot,
asks, and applies the answer. That keeps every rule table-testable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rendezvous.reasons import FAILURES, Reason, reason_kind, reason_text
from rendezvous.settings import Settings
from rendezvous.state import Assignment, JoinRecord, Member, RoundPhase, RoundState

SCALE_UP_PATIENCE = 1.0  # seconds a scale-up round waits, at least, for a running member


# --- what a node waiting for an assignment does next ---------------------------------------------
@dataclass(frozen=True)
class Reopen:
    """Open the round after ``after``: this node's workers in it are gone (failed, fenced).
    Pending until the round moves past ``after``, whoever opens it."""

    after: int
    why: str


@dataclass(frozen=True)
class Hold:
    """Do nothing until the round key changes."""

    why: str


@dataclass(frozen=True)
class Join:
    """Put this node's join key in round ``round`` (moving it out of any earlier one)."""

    round: int


@dataclass(frozen=True)
class Serve:
    """The round closed with this node as a member: hand out the assignment."""

    assignment: Assignment


@dataclass(frozen=True)
class Standby:
    """The round ``after`` closed without this node: wait, pre-joined to the next one."""

    after: int


@dataclass(frozen=True)
class Coordinate:
    """Take part in closing the open round ``round``: follow the joiner before us, or close it."""

    round: int


Step = Reopen | Hold | Join | Serve | Standby | Coordinate


@dataclass(frozen=True)
class Snapshot:
    """What a waiting node knows when it decides its next step."""

    round: RoundState
    node_id: str
    joined: int | None  # the round this node's join key is in (None: not joined)
    served: int  # the last round whose assignment this node handed out
    reopen: Reopen | None


def outstanding(reopen: Reopen | None, current: RoundState) -> Reopen | None:
    """A reopen is done once the round has moved past the one it was for."""
    return reopen if reopen is not None and current.number <= reopen.after else None


def next_step(snap: Snapshot) -> Step:
    rnd = snap.round
    reopen = outstanding(snap.reopen, rnd)
    if reopen is not None:
        return Hold(f"round {rnd.number} is open, not yet past round {reopen.after}") if rnd.is_open else reopen
    if not rnd.is_open and rnd.number <= snap.served:
        return Hold(f"round {rnd.number} already served; waiting for the next one to open")
    target = target_round(rnd, snap.node_id, snap.joined)
    if snap.joined != target:
        return Join(target)
    if rnd.is_open:
        return Coordinate(rnd.number)
    if rnd.number == target:
        assert rnd.assignment is not None  # target_round names a closed round only as its member
        return Serve(rnd.assignment)
    return Standby(rnd.number)


def target_round(rnd: RoundState, node_id: str, joined: int | None) -> int:
    """The round this node belongs in: an open one; a closed one it joined and is a member
    of; otherwise the one after (as a standby or a newcomer)."""
    if rnd.is_open:
        return rnd.number
    if joined == rnd.number and rnd.assignment is not None and node_id in rnd.assignment.node_ids:
        return rnd.number
    return rnd.number + 1


# --- closing an open round (the coordinator) -----------------------------------------------------

@dataclass(frozen=True)
class Joiner:
    """A node's join record for a round, with the revision that orders joiners."""

    record: JoinRecord
    create_revision: int

    @property
    def node_id(self) -> str:
        return self.record.node_id


@dataclass(frozen=True)
class RoundView:
    """What the round's coordinator knows: the open round, who joined, who is alive."""

    round: RoundState
    joined: tuple[Joiner, ...]
    alive: frozenset[str]
    # Local monotonic time when the newest joiner was first seen (never compared across nodes).
    last_join_seen: float


@dataclass(frozen=True)
class Wait:
    """Nothing to do yet. ``until`` is when to decide again without a new event (None: only on an event)."""

    until: float | None
    why: str


@dataclass(frozen=True)
class Close:
    round: RoundState
    why: str


def close_decision(view: RoundView, settings: Settings, now: float) -> Wait | Close:
    """Whether the open round should close now, and with which assignment."""
    if view.round.left_out:  # cut off from their peers: neither waited for nor admitted
        out = set(view.round.left_out)
        view = replace(view, joined=tuple(j for j in view.joined if j.node_id not in out), alive=view.alive - out)
    joined_ids = {j.node_id for j in view.joined}
    count = len(joined_ids)
    if reason_kind(view.round.reason) == Reason.SCALE_UP:
        # Growing the job must not evict a running member that is a moment late to rejoin
        # (it could then only grow the job back in turn): wait for every live one.
        # Bounded: a member whose loop hangs while its lease lives must not stop the job. A
        # healthy member rejoins within milliseconds of seeing the round open.
        late = sorted((view.alive & set(view.round.previous)) - joined_ids)
        patience = view.last_join_seen + max(settings.last_call, SCALE_UP_PATIENCE)
        if late and now < patience:
            return Wait(patience, f"scale-up waits for running members {', '.join(late)}")
    if count < settings.min_nodes:
        return Wait(None, f"{count} of at least {settings.min_nodes} nodes joined")
    if count >= settings.max_nodes:
        return Close(closed_round(view, settings), f"max nodes ({settings.max_nodes}) joined")
    # On a re-rendezvous everyone alive is known to be coming; at the job's start a node may
    # not have registered yet, so only max nodes or the last call close the first round.
    if reason_kind(view.round.reason) != Reason.START and view.alive <= joined_ids:
        return Close(closed_round(view, settings), f"every live node ({count}) joined")
    call = settings.last_call if reason_kind(view.round.reason) == Reason.START else settings.rejoin_call
    deadline = view.last_join_seen + call
    if now >= deadline:
        return Close(closed_round(view, settings), f"last call: no new node for {call}s")
    return Wait(deadline, f"{count} joined; last call until no new node for {call}s")


def rank_order(previous: tuple[str, ...], joined: tuple[Joiner, ...]) -> list[Joiner]:
    """Survivors keep their relative order; newcomers follow in the order they joined."""
    by_id = {j.node_id: j for j in joined}
    survivors = [by_id[node_id] for node_id in previous if node_id in by_id]
    known = set(previous)
    newcomers = sorted((j for j in joined if j.node_id not in known), key=lambda j: j.create_revision)
    return survivors + newcomers


def closed_round(view: RoundView, settings: Settings) -> RoundState:
    ordered = rank_order(view.round.previous, view.joined)
    chosen = ordered[: settings.max_nodes]
    head = chosen[0].record
    assignment = Assignment(
        round=view.round.number,
        members=tuple(Member(j.record.node_id, j.record.addr, j.record.nproc) for j in chosen),
        master_addr=head.addr,
        master_port=head.master_port,
        standbys=tuple(j.node_id for j in ordered[settings.max_nodes:]),
    )
    return RoundState(
        number=view.round.number, state=RoundPhase.CLOSED, reason=view.round.reason,
        previous=view.round.previous, assignment=assignment,
    )


def first_round() -> RoundState:
    return RoundState(number=1, state=RoundPhase.OPEN, reason=reason_text(Reason.START))


def next_round(current: RoundState, reason: str, left_out: tuple[str, ...] = ()) -> RoundState:
    """The round that follows a closed one; its ``previous`` carries the rank order forward.
    ``left_out``: members cut off from their peers, kept out of it."""
    if current.is_open:
        raise ValueError(f"round {current.number} is still open; cannot open the next one")
    previous = current.assignment.node_ids if current.assignment else ()
    return RoundState(number=current.number + 1, state=RoundPhase.OPEN, reason=reason, previous=previous,
                      left_out=left_out)


# A standby whose workers are still being prepared (its pre-started interpreter importing
# torch) waits for them this long at most before it grows the job anyway.
READY_PATIENCE = 30.0
READY_POLL = 0.05


def should_scale_up(current: RoundState, settings: Settings, waiting_since: float, now: float,
                    ready: bool = True) -> Wait | bool:
    """A standby asks: open the next round to raise the world size?

    Only when the closed round has room (fewer members than max), this standby has been
    waiting, alive, for the whole cool-down, so a flapping node cannot thrash the job, and
    its own workers are ready to start (``ready``), so that the job pauses for the change
    only once the newcomer can take part at once (up to READY_PATIENCE).
    """
    if current.is_open or current.assignment is None:
        return Wait(None, "round is open")
    if len(current.assignment.members) >= settings.max_nodes:
        return Wait(None, f"world is at max nodes ({settings.max_nodes})")
    ready_at = waiting_since + settings.scale_up_cooldown
    if now < ready_at:
        return Wait(ready_at, f"scale-up cool-down ({settings.scale_up_cooldown}s)")
    if not ready and now < waiting_since + READY_PATIENCE:
        return Wait(now + READY_POLL, "this node's workers are still being prepared")
    return True


# A standby that asked to grow the job opens the next round itself if the round's group rank
# 0 has not done so by then (an agent too old to know the request, or a loop that hangs).
GROW_PATIENCE = 10.0


@dataclass(frozen=True)
class AskGrowth:
    """Post a grow request on the closed round: its group rank 0 picks a step to stop at,
    lets every rank reach it, then opens the next round (no completed step is lost)."""


@dataclass(frozen=True)
class OpenGrowth:
    """Open the next round ourselves: nobody acted on our request in time."""


def growth_step(current: RoundState, settings: Settings, waiting_since: float, asked_at: float | None,
                now: float, me: str, workers_ready: bool = True) -> Wait | AskGrowth | OpenGrowth:
    """What a standby does about raising the world size (see :func:`should_scale_up`)."""
    ready = should_scale_up(current, settings, waiting_since, now, workers_ready)
    if ready is not True:
        return ready
    if current.grow_request != me or asked_at is None:
        if current.grow_request and current.grow_request != me:
            return Wait(None, f"{current.grow_request} already asked to grow the job")
        return AskGrowth()
    if now >= asked_at + GROW_PATIENCE:
        return OpenGrowth()
    return Wait(asked_at + GROW_PATIENCE, "group rank 0 is bringing every rank to a step boundary")


def with_stop(current: RoundState, step: int) -> RoundState:
    """``current`` with a step to stop at announced (the first announcement stands)."""
    return replace(current, stop_at=step if current.stop_at is None else current.stop_at)


def with_stop_asked(current: RoundState) -> RoundState:
    return replace(current, stop_asked=True)


def with_grow_request(current: RoundState, node_id: str) -> RoundState:
    return replace(current, grow_request=node_id)


def ring_predecessor(assignment: Assignment, node_id: str) -> str | None:
    """The member whose node key this member watches: each loss is noticed by exactly one node."""
    ids = assignment.node_ids
    if node_id not in ids or len(ids) < 2:
        return None
    return ids[ids.index(node_id) - 1]


@dataclass(frozen=True)
class Charge:
    """What closing a round does to the job-wide restart budget."""

    consume: bool
    exhausted: bool
    why: str


def charge_decision(rnd: RoundState, joined_ids: frozenset[str], used: int,
                    max_restarts: int | None) -> Charge:
    """Charge the budget once per failed round, decided by whoever closes the round.

    A worker failure seen while a member node vanished is that node's loss (its peers'
    collectives failed because it died), so it is charged only when every member of the
    previous round is back.
    """
    if reason_kind(rnd.reason) not in FAILURES:
        return Charge(False, False, f"membership change ({rnd.reason or 'start'})")
    lost = [n for n in rnd.previous if n not in joined_ids]
    if lost:
        return Charge(False, False, f"node lost ({', '.join(lost)}); not a worker failure")
    if max_restarts is not None and used >= max_restarts:
        return Charge(True, True, f"restart budget spent ({used} of {max_restarts} used); last failure: {rnd.reason}")
    return Charge(True, False, f"restart {used + 1} of {max_restarts if max_restarts is not None else 'unlimited'}")
