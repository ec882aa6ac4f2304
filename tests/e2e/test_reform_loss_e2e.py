"""A member lost while the group re-forms, end to end: two nodes train in process, a third
joins, and it is killed while the other two wait for it in the new round's group (a test
hook makes it come late: it is lost after the round closed, before it formed the group).
Real etcd, real agents, real gloo workers (tests/bin/inprocess_loop.py).

The survivors used to wait for it in ``init_process_group`` until the timeout, deaf to the
newer round the agents ordered meanwhile, and then ``run()`` raised: the workers crashed and
their in-memory state was lost. Now the newer order supersedes the older one: the watchdog
cuts the half-formed group, and the same worker processes form the newer round's group and
train on from the step they held."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.worker.inprocess import FORM_DELAY_ENV
from tests.e2e.harness import PYTHON, AgentProc, alive, wait_until
from tests.e2e.inprocess_log import reformed, started_lines

pytestmark = pytest.mark.e2e

LOOP = [PYTHON, str(Path(__file__).resolve().parents[1] / "bin" / "inprocess_loop.py"), "100000", "0.05"]
WAIT = 90.0


def test_a_member_lost_while_the_group_reforms_is_left_behind_and_the_workers_survive(cluster):
    agents = [cluster.start_agent(f"node-{i}", nproc=1, min_nodes=2, max_nodes=3, command=LOOP) for i in range(2)]
    wait_until(lambda: cluster.first_step_after(0.0, world_size=2), 120, "training at world size 2")
    wait_until(lambda: all(a.worker_pids() for a in agents), 30, "both agents' workers")
    pids = {a.node_id: a.worker_pids() for a in agents}

    late = cluster.start_agent("node-2", nproc=1, min_nodes=2, max_nodes=3, command=LOOP,
                               env={FORM_DELAY_ENV: "300"})
    wait_until(lambda: "test hook: forming the process group in" in late.text(), WAIT, "the joiner's worker, late")
    wait_until(lambda: all("workers re-form in process in round 2" in a.text() for a in agents), WAIT,
               "the two old nodes re-forming into round 2")
    killed = time.monotonic()
    late.kill_node()

    def back(agent: AgentProc) -> bool:
        assert len(started_lines(agent)) == 1, (f"{agent.node_id} restarted its workers", agent.text()[-3000:])
        return any(r.round > 2 for r in reformed(agent, 2))

    wait_until(lambda: all(back(a) for a in agents), WAIT, "the two old nodes re-formed without the lost one")
    wait_until(lambda: cluster.first_step_after(killed, world_size=2), WAIT, "training at world size 2 again")
    for agent in agents:
        assert agent.worker_pids() == pids[agent.node_id] and all(alive(p) for p in pids[agent.node_id])
        assert sorted(r.pid for r in reformed(agent, 2)) == sorted(pids[agent.node_id]), agent.text()[-3000:]
        assert "broke while forming" in agent.text() or "superseded" in agent.text(), agent.text()[-3000:]
    # No step lost, none trained twice: the world-3 group never trained, the old ranks held
    # their state through both re-forms.
    printed = [s for _, s, _ in cluster.steps()]
    assert printed == list(range(printed[-1] + 1)), printed
    assert {ws for _, _, ws in cluster.steps()} == {2}, cluster.steps()
