"""The chaos scenarios: each drives one fault through a fresh :class:`tests.chaos.world.World`
(3 etcd members and 3 agents in network namespaces, docs/examples/train_ddp.py restarting
from its checkpoints) and returns what it measured; the runner then checks the invariants.

A scenario records a violation (``world.extra_violations``) for what only it can judge, the
fault's own promise ("nothing restarts", "fenced within the deadline"); a wait that runs out
raises AssertionError (invariant 3: recovery is bounded) and the runner records that too.
The outages themselves are held with :func:`hold`: the fault's length is what is tested.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from tests.chaos.evidence import downtime, lost_steps
from tests.chaos.world import FENCE_SLACK_S, LEASE_TTL_S, SHUTDOWN_TIMEOUT_S, World
from tests.e2e.harness import AgentProc
from tests.waiting import wait_until

NODES = ["n0", "n1", "n2"]
RECOVERY_WAIT_S = 90.0
QUORUM_SHORT_S = 3.0  # well inside the lease TTL, even from a refresh sent TTL/3 before the loss
QUORUM_LONG_S = LEASE_TTL_S + 6.0
FREEZES_S = (6.0, LEASE_TTL_S + 5.0)  # past the presence TTL only; past the lease TTL too
COLLECTIVE_TIMEOUT_S = 20  # train_ddp --timeout: how a collective stuck on a lost peer ends (tests/chaos/peers.py)
RESTARTS = ("restarting the local workers", "lost our lease", "re-form", "fencing")
OPENED_RE = re.compile(r"round (\d+) opened")


@dataclass
class Measured:
    recovery_s: float
    lost: int
    note: str = ""


def hold(seconds: float) -> None:
    """Keep a fault in place this long: the outage's length is the thing under test."""
    time.sleep(seconds)


def _measure(world: World, since: float, note: str = "") -> Measured:
    tl = world.timeline()
    return Measured(downtime(tl, since, time.monotonic()), lost_steps(tl, since), note)


def _nothing_restarted(world: World, why: str) -> None:
    for agent in world.agents:
        text = agent.text()
        said = [w for w in RESTARTS if w in text] + OPENED_RE.findall(text)
        started = text.count("started 1 workers")
        if said or started != 1 or agent.proc.poll() is not None:
            world.extra_violations.append(f"{why}: {agent.node_id} restarted (said {said}, started workers "
                                          f"{started} times, exit {agent.proc.poll()})")


def _keep_training(world: World, world_size: int, seconds: float) -> None:
    """Training goes on at ``world_size`` for ``seconds`` from now (a pause longer than a few
    steps, or a restart, would show in the checks after)."""
    until = time.monotonic() + seconds
    wait_until(lambda: any(s.t > until and s.world_size == world_size for s in world.timeline().steps),
               seconds + RECOVERY_WAIT_S, f"training at world size {world_size} for {seconds:.0f}s more",
               interval=0.1)


def etcd_leader_then_follower(world: World) -> Measured:
    world.start_nodes(NODES)
    t0 = time.monotonic()
    leader = world.etcd.leader()
    assert leader is not None, "no etcd leader"
    world.etcd.kill(leader)
    wait_until(world.etcd.leader, 30, "a new etcd leader", interval=0.1)
    world.etcd.restart(leader)
    _keep_training(world, 3, 3.0)
    new_leader = world.etcd.leader()
    follower = next(m for m in world.etcd.members if m not in (leader, new_leader))  # a follower all along
    world.etcd.kill(follower)
    _keep_training(world, 3, LEASE_TTL_S + 2)  # past a lease TTL with one member down
    world.etcd.restart(follower)
    _keep_training(world, 3, 3.0)
    _nothing_restarted(world, "etcd leader and follower killed")
    return _measure(world, t0, f"leader {leader.name}, then follower {follower.name}")


def _lose_quorum(world: World, seconds: float) -> tuple[float, float]:
    """Kill two of the three members, hold, restart them. Returns (lost at, back at)."""
    victims = world.etcd.members[:2]
    lost = time.monotonic()
    for member in victims:
        world.etcd.kill(member)
    hold(seconds)
    for member in victims:
        world.etcd.restart(member)
    back = time.monotonic()
    wait_until(world.etcd.leader, 30, "an etcd leader after the quorum came back", interval=0.1)
    return lost, back


def quorum_lost_short(world: World) -> Measured:
    world.start_nodes(NODES)
    lost, back = _lose_quorum(world, QUORUM_SHORT_S)
    _keep_training(world, 3, LEASE_TTL_S + 2)
    _nothing_restarted(world, f"quorum lost for {back - lost:.1f}s")
    return _measure(world, lost, f"quorum lost {back - lost:.1f}s")


def quorum_lost_long(world: World) -> Measured:
    agents = world.start_nodes(NODES)
    pids = {name: world.watch_workers(agent) for name, agent in agents.items()}
    lost, back = _lose_quorum(world, QUORUM_LONG_S)
    deadline = lost + LEASE_TTL_S + SHUTDOWN_TIMEOUT_S + FENCE_SLACK_S
    for name, agent in agents.items():
        gone = world.pids.gone_at(pids[name])
        if gone is None or gone > deadline:
            world.extra_violations.append(f"inv 2: {name}'s workers {pids[name]} still ran {deadline - lost:.0f}s "
                                          f"after the quorum was lost (gone at {_rel(gone, lost)})")
        if "lost our lease" not in agent.text() and "fencing" not in agent.text():
            world.extra_violations.append(f"inv 2: {name} never said it fenced its workers")
    world.wait_training(3, back, RECOVERY_WAIT_S)
    _keep_training(world, 3, 5.0)
    return _measure(world, lost, f"quorum lost {back - lost:.1f}s; every node fenced")


def _rel(t: float | None, since: float) -> str:
    return "never" if t is None else f"+{t - since:.1f}s"


def _fenced_in_time(world: World, agent: AgentProc, pids: list[int], since: float, what: str) -> None:
    deadline = since + LEASE_TTL_S + SHUTDOWN_TIMEOUT_S + FENCE_SLACK_S
    wait_until(lambda: world.pids.gone_at(pids) is not None or time.monotonic() > deadline + 5, deadline - since + 10,
               f"{agent.node_id}'s workers gone", interval=0.1)
    gone = world.pids.gone_at(pids)
    if gone is None or gone > deadline:
        world.extra_violations.append(f"inv 2: {agent.node_id} ({what}) still ran workers {pids} "
                                      f"{deadline - since:.0f}s after (gone at {_rel(gone, since)})")


def partitioned_from_all(world: World) -> Measured:
    """The node of group rank 0 (the master, and the one that writes checkpoints) is cut off
    from etcd and its peers at once: a dead switch port, nothing refused, nothing reset."""
    world.start_nodes(NODES)
    victim = world.by_rank(0)
    host = world.hosts[victim.node_id]
    pids = world.watch_workers(victim)
    old_round = world.current_round()
    cut = time.monotonic()
    world.net.cut(host)
    try:
        moved_on = world.wait_training(2, cut, RECOVERY_WAIT_S, after_round=old_round)
        _fenced_in_time(world, victim, pids, cut, "cut off")
        _keep_training(world, 2, 3.0)
        others = world.current_round()
    finally:
        world.net.heal(host)
    healed = time.monotonic()
    back = world.wait_training(3, healed, RECOVERY_WAIT_S, after_round=others)
    _keep_training(world, 3, 3.0)
    if victim.proc.poll() is not None:
        world.extra_violations.append(f"{victim.node_id}'s agent exited ({victim.proc.poll()}) instead of rejoining")
    return _measure(world, cut, f"others on after {moved_on - cut:.1f}s; rejoined {back - healed:.1f}s after heal")


def frozen_and_thawed(world: World) -> Measured:
    """The node of group rank 0 is frozen whole (SIGSTOP: agent, keeper, workers), once past
    the presence TTL only, once past the lease TTL too. Thawed, its old workers must not add
    a step or a checkpoint to the round the others moved on to."""
    world.start_nodes(NODES)
    t0 = time.monotonic()
    notes = []
    for seconds in FREEZES_S:
        victim = world.by_rank(0)
        old_round = max(c.round for c in world.timeline().claims if c.node == victim.node_id)
        frozen_at = time.monotonic()
        frozen = victim.freeze()
        try:
            world.wait_training(2, frozen_at, RECOVERY_WAIT_S, after_round=old_round)
            hold(max(0.0, frozen_at + seconds - time.monotonic()))
            moved_on = world.current_round()
        finally:
            victim.thaw(frozen)
        thawed = time.monotonic()
        back = world.wait_training(3, thawed, RECOVERY_WAIT_S, after_round=moved_on)
        _keep_training(world, 3, 3.0)
        late = [s for s in world.checkpoints.seen if s.round == old_round and s.written > thawed]
        if late:
            world.extra_violations.append(f"inv 4: {victim.node_id} thawed wrote checkpoints of its old round "
                                          f"{old_round}: steps {[s.step for s in late]}")
        zombie = [s.step for s in world.timeline().steps
                  if s.node == victim.node_id and s.round == old_round and s.t > thawed + 1.0]
        if zombie:
            world.extra_violations.append(f"inv 1: {victim.node_id} thawed trained on in its old round "
                                          f"{old_round}: steps {zombie}")
        notes.append(f"{seconds:.0f}s: back {back - thawed:.1f}s after thaw")
    return _measure(world, t0, "; ".join(notes))


SCENARIOS: dict[str, Callable[[World], Measured]] = {
    "etcd leader, then follower killed": etcd_leader_then_follower,
    f"quorum lost < TTL ({QUORUM_SHORT_S:.0f}s)": quorum_lost_short,
    f"quorum lost > TTL ({QUORUM_LONG_S:.0f}s)": quorum_lost_long,
    "partitioned from etcd + peers": partitioned_from_all,
    "frozen (SIGSTOP), thawed": frozen_and_thawed,
}
