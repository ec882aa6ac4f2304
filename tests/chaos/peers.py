"""The chaos scenarios of the network between the nodes (issue 24): faults on the data network
(the nodes' ``--node-addr``, what their workers' collectives and the agents' peer probes use)
while every node still reaches etcd. etcd alone cannot see these; each scenario asserts what a
user would notice, with a deadline:

- *partitioned from peers only*: one node's frames to and from its peers go nowhere
  (tests/chaos/netns.py ``block``: etcd still answers it). The node cut off is the one removed,
  never one of the others, and the others train again within ``CUT_TARGET_S``.
- *lossy link*: one node's link drops a fraction of its frames to and from its peers
  (tests/chaos/lossy.py, ``netem loss`` in user space), ``LOSS_PHASES``: noticed (the node is
  out of the training group before the heavy phase ends) and not flapping (once out, it is not
  let back in and thrown out again while the link is bad); back in once the link is mended.
- *joiner that cannot reach the others*: a node joins while its data link to every member is
  cut. Kept out with its reason shown (``elastic-agent status`` or its log), the job trains on
  at its size; once the link is mended, it is let in.

A round's members are read from what the agents said they run (``round N: K nodes ...``), the
round's training from the steps printed; etcd's history is checked by the runner after.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from tests.chaos.evidence import Timeline
from tests.chaos.scenarios import (
    COLLECTIVE_TIMEOUT_S,
    OPENED_RE,
    RECOVERY_WAIT_S,
    Measured,
    _keep_training,
    _measure,
    hold,
)
from tests.chaos.world import World, train
from tests.waiting import wait_until

NODES = ["n0", "n1", "n2"]
LOSSY_HOST = "n1"  # the only relayed host (a relay per host costs CPU): the victim whatever its rank
JOINER_HOST = "n3"
CUT_TARGET_S = 3.0  # issue 24: "partitioned from peers only" detected and training again within this
RESTART_TARGET_S = 12.0  # restarted workers' cold start (torch, gloo) on 2 loaded cores, on top
CUT_WAIT_S = COLLECTIVE_TIMEOUT_S + 40.0  # long enough to see what a collective's timeout alone does
CUT_HOLD_S = 10.0  # the cut stays this long after the others train again: the victim stays out
LOSS_PHASES = ((0.3, 30.0), (0.8, 30.0))  # (fraction dropped each way, seconds held), in order
RATE_WINDOW_S = 5.0  # the step rate before the loss: over this long
NOTICE_S = 10.0  # the heavy phase's loss is noticed (the node out of training) within this
JOIN_HOLD_S = 30.0  # the unreachable joiner is kept out this long while the job trains on
JOIN_PAUSE_S = 5.0  # the longest pause in training the unreachable joiner may cause
REASON_RE = re.compile(r"unreachable|cannot reach|can't reach|connectivity|no answer from", re.IGNORECASE)
NEAR_MISS = "answered probes again after"  # agent.daemon.connection.peer_probe's info line of a peer silent a while
TRAINING_STEPS = 3  # steps that make a round count as training again
CLOSED_RE = re.compile(r"\bround (\d+) closed \(.*\): ([\w.-]+(?:, [\w.-]+)*|-)\s*$")


@dataclass(frozen=True)
class Trained:
    """A round that trained (printed steps) and who ran it, as the agents said."""

    round: int
    started: float  # its first step
    nodes: frozenset[str]
    size: int  # the node count its agents printed


@dataclass(frozen=True)
class Closed:
    """A round as its closer logged it: its members, whether or not it ever trained (a round
    whose connectivity check failed is moved on before its workers start, yet it cost every
    member a restart)."""

    round: int
    t: float
    nodes: frozenset[str]


def trained_rounds(tl: Timeline, since: float) -> list[Trained]:
    """The rounds whose first step came after ``since``, in order."""
    claimed: dict[int, set[str]] = {}
    sizes: dict[int, int] = {}
    for c in tl.claims:
        claimed.setdefault(c.round, set()).add(c.node)
        sizes[c.round] = c.nodes
    return [Trained(r, t, frozenset(claimed.get(r, ())), sizes.get(r, 0))
            for r, t in sorted(tl.round_started().items()) if t > since]


def closed_rounds(lines: Iterable[tuple[float, str]], since: float, until: float | None = None) -> list[Closed]:
    """The rounds closed between ``since`` and ``until``, in order, from (time, text) lines."""
    found: dict[int, Closed] = {}
    for t, text in lines:
        if t > since and (until is None or t <= until) and (m := CLOSED_RE.search(text)):
            nodes = frozenset() if m.group(2) == "-" else frozenset(m.group(2).split(", "))
            found.setdefault(int(m.group(1)), Closed(int(m.group(1)), t, nodes))
    return [found[n] for n in sorted(found)]


def _closed(world: World, since: float, until: float | None = None) -> list[Closed]:
    return closed_rounds(((line.t, line.text) for a in world.agents for line in list(a.lines)), since, until)


def moves(memberships: Iterable[Collection[str]], node: str, was_in: bool = True) -> tuple[int, int]:
    """(removals, readmissions) of ``node`` over consecutive rounds' members."""
    removals = readmissions = 0
    inside = was_in
    for members in memberships:
        now_in = node in members
        removals += inside and not now_in
        readmissions += now_in and not inside
        inside = now_in
    return removals, readmissions


def _training_without(world: World, node: str, since: float, size: int, timeout: float) -> Trained | None:
    """The first round after ``since`` that trained ``TRAINING_STEPS`` steps at ``size``
    without ``node``, or None by ``timeout``."""
    def found() -> Trained | None:
        tl = world.timeline()
        for r in trained_rounds(tl, since):
            steps = [s for s in tl.steps if s.round == r.round and s.world_size == size]
            if node not in r.nodes and r.size == size and len(steps) >= TRAINING_STEPS:
                return r
        return None

    try:
        return wait_until(found, timeout, f"training at world size {size} without {node}", interval=0.1)
    except AssertionError:
        return None


def _first_restart(world: World, since: float) -> float | None:
    times = [line.t for a in world.agents for line in list(a.lines)
             if line.t > since and ("worker failed" in line.text or OPENED_RE.search(line.text))]
    return min(times, default=None)


def _rel(t: float | None, since: float) -> str:
    return "never" if t is None else f"+{t - since:.1f}s"


def _listed(rounds: list[Closed]) -> str:
    return "; ".join(f"{r.round}: {','.join(sorted(r.nodes))}" for r in rounds)


def _never_the_wrong_node(world: World, rounds: list[Closed], others: list[str], what: str) -> None:
    for r in rounds:
        if set(others) - r.nodes:
            world.extra_violations.append(f"{what}: round {r.round} closed without {sorted(set(others) - r.nodes)} "
                                          f"(a healthy node removed)")


def partitioned_from_peers(world: World, inprocess: bool = False, rank: int = 1) -> Measured:
    """A node whose peers cannot reach it (nor it them) while etcd still can: without peer
    liveness its workers and theirs wait in a collective that never completes until the
    collective's timeout (train_ddp ``--timeout``). The node cut off must be the one removed,
    and the others train again within ``CUT_TARGET_S`` (their workers re-formed in process;
    restarted workers are given ``RESTART_TARGET_S`` more); mended, it comes back. ``rank``:
    the cut-off node's group rank (0 holds the workers' store and writes the checkpoints)."""
    mode = ("--inprocess",) if inprocess else ()
    world.start_nodes(NODES, command=train(*mode, "--timeout", str(COLLECTIVE_TIMEOUT_S)))
    victim = world.by_rank(rank)
    host = world.hosts[victim.node_id]
    others = [a.node_id for a in world.agents if a is not victim]
    blocked = time.monotonic()
    for peer in others:
        world.net.block(host, world.hosts[peer])
    try:
        again = _training_without(world, victim.node_id, blocked, len(others), CUT_WAIT_S)
        if again is not None:
            hold(max(0.0, again.started + CUT_HOLD_S - time.monotonic()))
    finally:
        for peer in others:
            world.net.unblock(host, world.hosts[peer])
    healed = time.monotonic()
    restart = _first_restart(world, blocked)
    during = _closed(world, blocked, healed)
    _never_the_wrong_node(world, during, others, "partitioned from peers")
    removals, readmissions = moves((r.nodes for r in during), victim.node_id)
    if readmissions:
        world.extra_violations.append(f"partitioned from peers: {victim.node_id} was let back in {readmissions} "
                                      f"times while still cut off (rounds {_listed(during)})")
    if again is None:
        world.extra_violations.append(f"partitioned from peers: {victim.node_id} was never removed in "
                                      f"{CUT_WAIT_S:.0f}s (first restart {_rel(restart, blocked)})")
    elif again.started - blocked > CUT_TARGET_S + (0.0 if inprocess else RESTART_TARGET_S):
        world.extra_violations.append(
            f"partitioned from peers: training again without {victim.node_id} only {again.started - blocked:.1f}s "
            f"after the cut (target {CUT_TARGET_S + (0.0 if inprocess else RESTART_TARGET_S):.0f}s)")
    if restart is None or restart - blocked > CUT_TARGET_S:
        world.extra_violations.append(f"partitioned from peers: the cut was acted on (a round opened, a worker "
                                      f"failed) only at {_rel(restart, blocked)} (target {CUT_TARGET_S:.0f}s)")
    back = world.wait_training(3, healed, RECOVERY_WAIT_S)
    _keep_training(world, 3, 3.0)
    moved = "never" if again is None else f"{again.started - blocked:.1f}s"
    return _measure(world, blocked, f"{victim.node_id} cut off; others training again after {moved} (first "
                                    f"restart {_rel(restart, blocked)}); removed {removals}x, let in {readmissions}x "
                                    f"while cut; all 3 again {back - healed:.1f}s after mend")


@dataclass(frozen=True)
class Phase:
    fraction: float
    start: float
    end: float
    dropped: int
    frames: int
    status: str  # ``elastic-agent status`` at its end


def lossy_link(world: World) -> Measured:
    """One node's link drops frames to and from its peers, lightly then heavily
    (``LOSS_PHASES``). Each phase must be noticed (the node removed, or named in a log line or
    ``elastic-agent status``); in the heavy one it is out within ``NOTICE_S`` and stays out.
    Not flapping: removed at most once while the link is bad (each round with it and without
    it again restarts every node's workers). Mended: back in."""
    world.start_nodes(NODES)
    _keep_training(world, 3, RATE_WINDOW_S)  # the step rate before the loss, past the start's
    victim = LOSSY_HOST
    others = [n for n in world.hosts if n != victim]
    began = time.monotonic()
    before = len(world.timeline().steps_between(began - RATE_WINDOW_S, began)) / RATE_WINDOW_S
    phases: list[Phase] = []
    try:
        for fraction, seconds in LOSS_PHASES:
            world.net.set_loss(LOSSY_HOST, fraction, [world.hosts[n] for n in others])
            start = time.monotonic()
            hold(seconds)
            end = time.monotonic()
            passed, dropped = world.net.loss_count(LOSSY_HOST)
            phases.append(Phase(fraction, start, end, dropped, passed + dropped, world.status()))
    finally:
        world.net.set_loss(LOSSY_HOST, 0.0)
    mended = time.monotonic()
    during = _closed(world, began, mended)
    _never_the_wrong_node(world, during, others, "lossy link")
    removals, readmissions = moves((r.nodes for r in during), victim)
    if removals > 1:
        world.extra_violations.append(f"lossy link: {victim} flapped: removed {removals} times, let back in "
                                      f"{readmissions} times while its link dropped frames (rounds {_listed(during)})")
    notes = []
    for p in phases:
        rounds = [r for r in during if p.start < r.t <= p.end]
        out, back_in = moves((r.nodes for r in rounds), victim, was_in=_member_at(during, victim, p.start))
        rate = len(world.timeline().steps_between(p.start, p.end)) / (p.end - p.start)
        named = _named(world, victim, p)
        noticed = out or back_in or named
        notes.append(f"{p.fraction:.0%} ({p.dropped}/{p.frames} frames): {rate:.1f} steps/s, removed {out}x, "
                     f"let in {back_in}x{', named' if named else ''}")
        if not noticed:
            world.extra_violations.append(f"lossy link: {victim} dropping {p.dropped}/{p.frames} frames for "
                                          f"{p.end - p.start:.0f}s went unnoticed (training at {rate:.1f} steps/s, "
                                          f"{before:.1f} before)")
    heavy = phases[-1]
    out_at = _out_for_good(during, victim)
    if out_at is None or out_at > heavy.start + NOTICE_S:
        world.extra_violations.append(f"lossy link: {victim} dropping {heavy.fraction:.0%} of its frames was not "
                                      f"out for good {NOTICE_S:.0f}s into it (out {_rel(out_at, heavy.start)})")
    back = world.wait_training(3, mended, RECOVERY_WAIT_S)
    _keep_training(world, 3, 3.0)
    return _measure(world, began, f"{before:.1f} steps/s before; {'; '.join(notes)}; removed {removals}x, let in "
                                  f"{readmissions}x in all, out for good {_rel(out_at, heavy.start)} into the "
                                  f"{heavy.fraction:.0%} phase; all 3 again {back - mended:.1f}s after mend")


def _member_at(rounds: list[Closed], node: str, t: float) -> bool:
    """Whether ``node`` was in the last round closed before ``t`` (in, before any)."""
    last = [r for r in rounds if r.t <= t]
    return node in last[-1].nodes if last else True


def _out_for_good(rounds: list[Closed], node: str) -> float | None:
    """When the rounds stopped having ``node``: the first closed without it after the last
    with it, or None when the last still had it (or none closed)."""
    out = None
    for r in rounds:
        out = None if node in r.nodes else (out or r.t)
    return out


def _named(world: World, node: str, phase: Phase) -> bool:
    """Whether a log line in ``phase`` or the status at its end names ``node``'s reachability.
    Near misses do not count: a loaded machine logs them of healthy peers too."""
    said = [line.text for a in world.agents for line in list(a.lines)
            if phase.start < line.t <= phase.end and REASON_RE.search(line.text) and NEAR_MISS not in line.text
            and (a.node_id == node or re.search(rf"\b{re.escape(node)}\b", line.text))]
    shown = [line for line in phase.status.splitlines() if REASON_RE.search(line) and node in line]
    return bool(said or shown)


def unreachable_joiner(world: World) -> Measured:
    """A node joins while its data link to every member is cut (etcd reachable). It must be
    kept out, with its reason shown, while the job trains on at its size; mended, it is let in."""
    world.start_nodes(NODES, command=train("--timeout", str(COLLECTIVE_TIMEOUT_S)))
    joiner_host = JOINER_HOST
    for peer in NODES:
        world.net.block(joiner_host, peer)
    t0 = time.monotonic()
    joiner = world.start_node(joiner_host, command=train("--timeout", str(COLLECTIVE_TIMEOUT_S)))
    try:
        wait_until(lambda: "joined job" in joiner.text(), 120.0, f"{joiner_host}'s agent in etcd", interval=0.1)
        joined = time.monotonic()
        hold(JOIN_HOLD_S)
        status = world.status()
    finally:
        for peer in NODES:
            world.net.unblock(joiner_host, peer)
    mended = time.monotonic()
    tl = world.timeline()
    let_in = [r.round for r in _closed(world, t0, mended) if joiner_host in r.nodes]
    if let_in:
        world.extra_violations.append(f"unreachable joiner: {joiner_host} was let into rounds {let_in} "
                                      f"while it could reach no member")
    pause = _longest_pause(tl, joined, mended)
    if pause > JOIN_PAUSE_S:
        world.extra_violations.append(f"unreachable joiner: training paused {pause:.1f}s while {joiner_host} "
                                      f"tried to join (at most {JOIN_PAUSE_S:.0f}s)")
    shown = [line for line in status.splitlines() if joiner_host in line and REASON_RE.search(line)]
    logged = [line.text for line in list(joiner.lines) if REASON_RE.search(line.text)]
    if not shown and not logged:
        world.extra_violations.append(f"unreachable joiner: no reason shown for keeping {joiner_host} out "
                                      f"(status said: {status.strip()[-300:]!r})")
    back = world.wait_training(4, mended, RECOVERY_WAIT_S)
    _keep_training(world, 4, 3.0)
    reason = (shown or logged or ["none"])[0].strip()[:120]
    return _measure(world, joined, f"kept out {mended - joined:.0f}s, longest pause {pause:.1f}s, reason: "
                                   f"{reason!r}; in {back - mended:.1f}s after mend")


def _longest_pause(tl: Timeline, since: float, until: float) -> float:
    times = [since, *(s.t for s in tl.steps_between(since, until)), until]
    return max(b - a for a, b in zip(times, times[1:]))


PEER_SCENARIOS = {
    "partitioned from peers only (in process)": functools.partial(partitioned_from_peers, inprocess=True),
    "partitioned from peers only (in process, rank 0)": functools.partial(partitioned_from_peers, inprocess=True,
                                                                          rank=0),
    "partitioned from peers only (workers restart)": partitioned_from_peers,
    "lossy link to peers (30%, then 80%)": lossy_link,
    "joiner cannot reach the others": unreachable_joiner,
}
RELAYED = {"lossy link to peers (30%, then 80%)": (LOSSY_HOST,)}
