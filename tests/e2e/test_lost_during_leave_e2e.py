"""A node lost while the job heads for a leaver's stop step. Real etcd, real agents (started
as the README shows: default flags, one working directory, one shared checkpoint directory),
real gloo workers running train_ddp.py ``--inprocess``.

The fault: node-1 is asked to leave (SIGTERM), so every agent is told a step to stop after;
right then, before the ranks get there, node-2 freezes whole (SIGSTOP of its agent, keeper and
workers: a reclaimed machine). No rank can reach the stop step any more: every collective now
waits for node-2's frozen worker. The stop step must not be waited for: the survivors abort
the broken group and re-form as soon as node-2's presence runs out (seconds), and the leaver
stops its workers and exits 3. Waiting for the step instead costs the process group's 60 s
timeout (the survivors) and --drain-timeout's 60 s (the leaver): `make chaos`'s soak paused
training for 64 s once, and this test failed that way before the fix.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.e2e.harness import AgentProc, Cluster, consoles, wait_until
from tests.e2e.inprocess_log import inprocess_job

pytestmark = pytest.mark.e2e

STEP_S = 1.0  # slow steps: a stop step is announced a few steps ahead, so a second or two off
RECOVER_S = 25.0  # presence TTL (2 s), a rendezvous and a re-form, on a loaded 2-core machine;
# far below the 60 s a wait for the unreachable step costs


def announced(agent: AgentProc, since: float) -> bool:
    return any("workers stop after step" in line.text for line in list(agent.lines) if line.t >= since)


def test_a_node_lost_on_the_way_to_a_leavers_stop_step_costs_seconds_not_the_timeouts(cluster: Cluster):
    command = [*inprocess_job(cluster), "--step-time", str(STEP_S)]
    agents = {f"node-{i}": cluster.start_agent(f"node-{i}", nproc=1, command=command) for i in range(4)}
    t0 = time.monotonic()
    wait_until(lambda: cluster.first_step_after(t0, world_size=4), 120, "training at world size 4")

    leaving = time.monotonic()
    agents["node-1"].signal(signal.SIGTERM)
    wait_until(lambda: announced(agents["node-3"], leaving), 15, "node-3 to be told the stop step")
    frozen = agents["node-2"].freeze()
    lost = time.monotonic()
    try:
        resumed = wait_until(lambda: cluster.first_step_after(lost, world_size=2), RECOVER_S + 60,
                             "training at world size 2 (node-1 left, node-2 lost)")
        took = resumed[0] - lost
        assert took < RECOVER_S, (f"training resumed {took:.1f} s after node-2 froze", consoles(agents, leaving - 1))
        assert agents["node-1"].wait(timeout=RECOVER_S) == 3, consoles(agents, leaving - 1)
        assert time.monotonic() - lost < RECOVER_S + 5, ("the leaver waited out its drain",
                                                         consoles(agents, leaving - 1))
        for name in ("node-0", "node-3"):
            assert agents[name].proc.poll() is None, (f"{name} exited", consoles(agents, leaving - 1))
    finally:
        AgentProc.thaw(frozen)
