"""Recovery in process, end to end: docs/examples/train_ddp.py ``--inprocess`` (the loop in
``Elastic.run``) under agents started as the README shows (the harness: default flags, one
working directory, one shared checkpoint directory), 3 nodes, min 2, max 4. Real etcd, real
agents, real gloo workers.

What a user notices, asserted here (never how fast it is):
- the worker processes stay: the pids the agent started are the ones that re-form (the
  helper's own lines carry their pid) and the agent starts no others;
- no completed step is lost, none trained twice: at a planned change (a SIGTERM, a join) the
  job goes on at exactly the next step; at a kill or a freeze, right after the step every
  survivor holds (the one in flight may have completed unprinted: the helper says which);
- nothing is read from disk after the job's first start: a newcomer takes the state from a
  peer, and the checkpoint directory's fence (raised by every load) still names round 1.
The last test runs the same job without ``--inprocess``: there a kill -9 restarts the workers
(new pids) from the checkpoint, so the first tests fail if in-process mode fell back to that.

The job's script is train_ddp.py unchanged, run behind a few lines that show the helper's
INFO log, as a user's own ``logging`` setup would: without them it prints only warnings.
"""

from __future__ import annotations

import signal
import time

import pytest

from agent.worker.checkpoint import latest_step
from agent.worker.manifest import read_fence
from tests.e2e.harness import PYTHON, STEP_RE, TRAIN, AgentProc, Cluster, alive, wait_until
from tests.e2e.inprocess_log import LEFT_RE, Reformed, inprocess_job, reformed, started_lines, took_state

pytestmark = pytest.mark.e2e

WAIT = 90.0  # generous: the machine may be shared with other test runs


def steps_of(agents: list[AgentProc]) -> list[tuple[float, int, int]]:
    """(time, step, world size) of the step lines these agents' rank-0 worker printed."""
    return sorted((line.t, int(m.group(1)), int(m.group(2)))
                  for a in agents for line in list(a.lines) if (m := STEP_RE.search(line.text)))


def wait_for_reform(agents: list[AgentProc], world: int, what: str) -> list[Reformed]:
    """Every worker of ``agents`` re-formed into a group of ``world`` ranks; their lines.
    Fails at once when an agent started workers anew instead (a process restart)."""
    def done() -> list[Reformed] | None:
        for agent in agents:
            assert len(started_lines(agent)) == 1, (f"{agent.node_id} restarted its workers", started_lines(agent))
        lines = [r for a in agents for r in reformed(a, world)]
        workers = sum(len(a.worker_pids()) for a in agents)
        assert len(lines) <= workers, (f"more re-forms into {world} ranks than workers: the job re-formed twice", lines)
        return lines if len(lines) == workers else None

    return wait_until(done, WAIT, what)


def assert_same_workers(agent: AgentProc, pids: list[int], world: int) -> None:
    """The agent started no workers since ``pids``, and those very processes re-formed into
    the group of ``world`` ranks."""
    assert len(started_lines(agent)) == 1, (agent.node_id, started_lines(agent))
    assert agent.worker_pids() == pids, (agent.node_id, pids, agent.worker_pids())
    assert all(alive(pid) for pid in pids), (agent.node_id, pids)
    assert sorted(r.pid for r in reformed(agent, world)) == sorted(pids), (agent.node_id, reformed(agent, world))
    assert "workers re-form in process in round" in agent.text(), agent.text()[-3000:]


def held_step(lines: list[Reformed]) -> int:
    """The one step every re-formed rank says it goes on after."""
    steps = {r.after for r in lines}
    assert len(steps) == 1, lines
    return steps.pop()


def assert_nothing_read_from_disk(cluster: Cluster) -> None:
    # A load prints "resumed from step"/"starting from step" in train_ddp's own loop (the one
    # a fallback from in-process mode would run), and raises the directory's fence to its round.
    assert cluster.resumes() == [], cluster.resumes()
    assert read_fence(cluster.checkpoint_dir) == 1, (cluster.checkpoint_dir / "fence.json").read_text()


def no_agent_traceback(agent: AgentProc) -> bool:
    return not any(line.text.startswith("Traceback") for line in agent.lines)


def start_three(cluster: Cluster, command: list[str]) -> dict[str, AgentProc]:
    agents = {f"node-{i}": cluster.start_agent(f"node-{i}", nproc=1, command=command) for i in range(3)}
    t0 = time.monotonic()
    wait_until(lambda: cluster.first_step_after(t0, world_size=3), 120, "training at world size 3")
    wait_until(lambda: all(a.worker_pids() and a.group_rank() is not None for a in agents.values()), 30,
               "every agent's workers and group rank")
    return agents


def some_steps(cluster: Cluster, after: float, world: int, count: int = 5) -> None:
    wait_until(lambda: len([s for s in cluster.steps() if s[0] > after and s[2] == world]) >= count, WAIT,
               f"{count} steps at world size {world}")


def test_kill_join_and_leave_keep_the_worker_processes_and_lose_no_step(cluster):
    job = inprocess_job(cluster)
    agents = start_three(cluster, job)
    pids = {name: a.worker_pids() for name, a in agents.items()}
    some_steps(cluster, 0.0, world=3)

    # kill -9 of a node, agent and workers. Not group rank 0: its worker prints the step
    # lines, and a killed agent's console may lose the last ones.
    victim = next(a for a in agents.values() if a.group_rank() == 1)
    survivors = [a for a in agents.values() if a is not victim]
    killed = time.monotonic()
    victim.kill_node()
    lines = wait_for_reform(survivors, 2, "the survivors re-formed at world size 2")
    wait_until(lambda: cluster.first_step_after(killed, world_size=2), WAIT, "training at world size 2")
    for agent in survivors:
        assert_same_workers(agent, pids[agent.node_id], world=2)
    last_before = max(s for t, s, ws in cluster.steps() if ws == 3)
    held = held_step(lines)
    # The step in flight at the kill either never happened or completed everywhere (its
    # optimizer step ran) before its line could be printed.
    assert last_before <= held <= last_before + 1, (last_before, lines)
    assert cluster.first_step_after(killed, world_size=2)[1] == held + 1, (held, cluster.steps()[-20:])
    killed_step = held

    # A 4th node (2 workers) joins: the job grows to world size 4 after one announced step.
    some_steps(cluster, killed, world=2)
    joining = time.monotonic()
    newcomer = agents["node-3"] = cluster.start_agent("node-3", nproc=2, command=job)
    lines = wait_for_reform(survivors, 4, "the survivors re-formed at world size 4")
    wait_until(lambda: cluster.first_step_after(joining, world_size=4), WAIT, "training at world size 4")
    grown_after = held_step(lines)
    assert {r.why for r in lines} == {f"a planned change after step {grown_after}"}, lines
    for agent in survivors:
        assert_same_workers(agent, pids[agent.node_id], world=4)
    assert max(s for t, s, ws in cluster.steps() if ws == 2) == grown_after
    assert cluster.first_step_after(joining, world_size=4)[1] == grown_after + 1
    # Its workers took the state of that step from a peer (an old rank), not from disk.
    pids["node-3"] = newcomer.worker_pids()
    old_ranks = {r.rank for r in lines}
    took = wait_until(lambda: len(took_state(newcomer)) == 2 and took_state(newcomer), 30,
                      "both new workers to take the state")
    assert set(took) == set(pids["node-3"]), (took, pids["node-3"])
    for step, source in took.values():
        assert step == grown_after and source in old_ranks, (took, old_ranks)

    # SIGTERM of a node's agent: it leaves at an announced step and exits 3; its worker, the
    # one started with the job, exits there; the others go on at world size 3.
    some_steps(cluster, joining, world=4)
    leaver = next(a for a in survivors if a.group_rank() != 0)
    stayers = [a for a in (*survivors, newcomer) if a is not leaver]
    leaving = time.monotonic()
    leaver.signal(signal.SIGTERM)
    assert leaver.wait(timeout=WAIT) == 3, leaver.text()[-3000:]
    left = [(int(m.group(1)), int(m.group(2))) for m in map(LEFT_RE.search, leaver.text().splitlines()) if m]
    assert [pid for pid, _ in left] == pids[leaver.node_id], (left, pids[leaver.node_id])
    stop_at = left[0][1]
    assert f"workers stop after step {stop_at} and exit: this node leaves" in leaver.text()
    assert not any(alive(pid) for pid in pids[leaver.node_id])
    lines = wait_for_reform(stayers, 3, "the others re-formed at world size 3")
    wait_until(lambda: cluster.first_step_after(leaving, world_size=3), WAIT, "training at world size 3 again")
    assert held_step(lines) == stop_at, (stop_at, lines)
    for agent in stayers:
        assert_same_workers(agent, pids[agent.node_id], world=3)
    assert max(s for t, s, ws in cluster.steps() if ws == 4) == stop_at
    assert cluster.first_step_after(leaving, world_size=3)[1] == stop_at + 1

    # Over the whole run every step was printed once, in order; the only one that may lack
    # its line is the step in flight at the kill, when it completed before the group broke.
    some_steps(cluster, leaving, world=3)
    printed = [s for t, s, ws in cluster.steps()]
    assert printed == sorted(set(printed)), printed
    missing = set(range(printed[0], printed[-1] + 1)) - set(printed)
    assert missing <= {killed_step}, (sorted(missing), killed_step)
    assert printed[0] == 0
    assert_nothing_read_from_disk(cluster)
    for agent in stayers:
        assert agent.proc.poll() is None and no_agent_traceback(agent), agent.text()[-3000:]


def test_a_frozen_node_is_cut_out_in_process_and_its_thaw_corrupts_nothing(cluster):
    agents = start_three(cluster, inprocess_job(cluster))
    pids = {name: a.worker_pids() for name, a in agents.items()}
    some_steps(cluster, 0.0, world=3)

    # The node of group rank 0 frozen whole: its worker holds the old group's store, no
    # socket closes, nothing answers. The survivors' collectives just wait, until the agents
    # see its presence lapse and release them.
    victim = next(a for a in agents.values() if a.group_rank() == 0)
    survivors = [a for a in agents.values() if a is not victim]
    frozen = victim.freeze()
    frozen_at = time.monotonic()
    lines = wait_for_reform(survivors, 2, "the survivors re-formed at world size 2")
    wait_until(lambda: steps_of(survivors), WAIT, "the survivors training at world size 2")
    for agent in survivors:
        assert_same_workers(agent, pids[agent.node_id], world=2)
    held = held_step(lines)
    some_steps(cluster, frozen_at, world=2, count=10)

    thawed_at = time.monotonic()
    victim.thaw(frozen)
    # Back, it finds the job moved on without it: it comes back in as a newcomer (or leaves).
    wait_until(lambda: cluster.first_step_after(thawed_at, world_size=3) or victim.proc.poll() is not None, WAIT,
               "the thawed node back in the job, or gone")
    some_steps(cluster, thawed_at, world=3 if victim.proc.poll() is None else 2, count=10)

    for agent in survivors:
        assert agent.proc.poll() is None and no_agent_traceback(agent), agent.text()[-3000:]
        assert len(started_lines(agent)) == 1 and agent.worker_pids() == pids[agent.node_id], started_lines(agent)
        assert all(alive(pid) for pid in pids[agent.node_id])
    # The frozen node's printed steps (some may arrive only after the thaw) end where the
    # survivors went on; the survivors' steps run on, one by one, through its return.
    frozen_round = [s for t, s, ws in steps_of([victim])]
    assert frozen_round and all(ws == 3 for t, s, ws in steps_of([victim])), steps_of([victim])
    assert max(frozen_round) <= held <= max(frozen_round) + 1, (frozen_round[-3:], held)
    theirs = [(s, ws) for t, s, ws in steps_of(survivors)]
    assert [s for s, ws in theirs] == list(range(held + 1, held + 1 + len(theirs))), theirs
    if victim.proc.poll() is None:
        grown = wait_for_reform(survivors, 3, "the survivors re-formed at world size 3")
        grown_after = held_step(grown)
        assert [ws for s, ws in theirs] == [2 if s <= grown_after else 3 for s, ws in theirs], theirs
        # Its worker (the same process, or one its agent restarted) took the state from a peer.
        took = took_state(victim)
        assert set(victim.worker_pids()) <= set(took), (victim.worker_pids(), took)
        assert all(took[pid][0] == grown_after for pid in victim.worker_pids()), (took, grown_after)
        assert no_agent_traceback(victim), victim.text()[-3000:]
    assert_nothing_read_from_disk(cluster)


def test_without_inprocess_a_kill_restarts_the_workers_from_the_checkpoint(cluster):
    agents = start_three(cluster, [PYTHON, str(TRAIN), "--steps", "100000", "--checkpoint-every", "10"])
    pids = {name: a.worker_pids() for name, a in agents.items()}
    wait_until(lambda: latest_step(cluster.checkpoint_dir) is not None, WAIT, "a first checkpoint")
    some_steps(cluster, time.monotonic(), world=3, count=2)

    victim = next(a for a in agents.values() if a.group_rank() == 1)
    survivors = [a for a in agents.values() if a is not victim]
    killed = time.monotonic()
    victim.kill_node()
    wait_until(lambda: cluster.first_step_after(killed, world_size=2), WAIT, "training at world size 2")
    for agent in survivors:
        assert "stopped local workers of round 1" in agent.text(), agent.text()[-3000:]
        assert len(started_lines(agent)) == 2, started_lines(agent)
        assert not set(agent.worker_pids()) & set(pids[agent.node_id]), (agent.worker_pids(), pids[agent.node_id])
        assert not any(alive(pid) for pid in pids[agent.node_id])
        assert reformed(agent, 2) == []
    # The new workers read the checkpoint from disk: one of every 10 steps (of step 10k - 1).
    resumed = [(t, step) for t, step in cluster.resumes() if t > killed]
    assert resumed and resumed[0][1] > 0 and resumed[0][1] % 10 == 0, cluster.resumes()
    assert read_fence(cluster.checkpoint_dir) > 1
