"""A straggler, end to end: three agents, real etcd, real gloo workers in lockstep
(tests/bin/straggler_loop.py), one node's steps three times slower.

What a user notices: ``elastic_agent_step_time_ratio`` names the slow node (about 3) and not
the others (about 1); with ``--straggler-evict`` the slow node leaves at an announced step
boundary (exit 3, as on SIGTERM, saying why) and the others train on at world size 2 from
exactly the next step: no step lost, none trained twice.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.e2e.harness import PYTHON, REPO, AgentProc, Cluster, wait_until

pytestmark = pytest.mark.e2e

LOOP = REPO / "tests" / "bin" / "straggler_loop.py"
WAIT = 120.0  # generous: the machine may be shared with other test runs
RATIO_RE = re.compile(r'^elastic_agent_step_time_ratio\{[^}]*\} (\S+)$', re.M)
DRAINED_RE = re.compile(r"drained at step (\d+)")
RESUMED_RE = re.compile(r"resumed from step (\d+)")


def ratio(agent: AgentProc) -> float | None:
    try:
        code, text = agent.scrape()
    except OSError:
        return None
    m = RATIO_RE.search(text) if code == 200 else None
    value = float(m.group(1)) if m else float("nan")
    return None if value != value else value


def start(cluster: Cluster, extra: list[str]) -> dict[str, AgentProc]:
    command = [PYTHON, str(LOOP), "100000", "0.1", "node-2", "3"]
    return {f"node-{i}": cluster.start_agent(f"node-{i}", nproc=1, command=command, extra=extra)
            for i in range(3)}


def test_a_slow_node_is_reported_then_leaves_at_a_step_boundary_losing_no_step(cluster):
    agents = start(cluster, ["--straggler-evict", "--straggler-window", "4"])
    slow, fast = agents["node-2"], [agents["node-0"], agents["node-1"]]
    wait_until(lambda: (r := ratio(slow)) is not None and r > 2.5, WAIT, "the slow node's ratio above 2.5")
    for agent in fast:
        value = wait_until(lambda a=agent: ratio(a), WAIT, f"{agent.node_id}'s ratio")
        assert 0.5 < value < 1.5, (agent.node_id, value)

    assert slow.wait(timeout=WAIT) == 3, slow.text()[-3000:]
    assert "leaving as a straggler (--straggler-evict)" in slow.text()
    left = time.monotonic()
    wait_until(lambda: cluster.first_step_after(left, world_size=2), WAIT, "training at world size 2")
    text = "\n".join(a.text() for a in agents.values())
    drained = {int(s) for s in DRAINED_RE.findall(text)}
    assert len(drained) == 1, drained
    stop_at = drained.pop()
    assert [int(s) for s in RESUMED_RE.findall(text)] == [stop_at + 1], text[-3000:]
    assert max(s for _, s, ws in cluster.steps() if ws == 3) == stop_at
    printed = [s for _, s, _ in cluster.steps()]
    assert printed == list(range(printed[0], printed[-1] + 1)), printed  # each step once, none missing
    for agent in fast:
        assert agent.proc.poll() is None, agent.text()[-3000:]


def test_without_evict_the_slow_node_is_only_reported(cluster):
    agents = start(cluster, ["--straggler-window", "4"])
    wait_until(lambda: (r := ratio(agents["node-2"])) is not None and r > 2.5, WAIT, "the slow node's ratio")
    since = time.monotonic()
    # Eviction would have come within the window (4 s) and a few comparisons: wait past that.
    wait_until(lambda: time.monotonic() - since > 8 and cluster.first_step_after(since + 8, world_size=3),
               WAIT, "training on at world size 3")
    assert all(a.proc.poll() is None for a in agents.values())
