"""A frozen node with a plain script that handles SIGTERM: the survivors' ranks sit in the
all-reduce the frozen peer left hanging, so their handler cannot run, and the agent's SIGKILL
after --abort-timeout (not --shutdown-timeout) is what lets them train again. Real etcd,
real agents, real workers."""

from __future__ import annotations

import time

import pytest

from tests.e2e.harness import PYTHON, REPO, wait_until

pytestmark = pytest.mark.e2e

HANDLER_SCRIPT = REPO / "tests" / "bin" / "sigterm_handler_ddp.py"


def test_a_frozen_node_with_a_sigterm_handling_script_is_replaced_within_5_s(cluster):
    command = [PYTHON, str(HANDLER_SCRIPT)]
    agents = [cluster.start_agent(f"node-{i}", nproc=1, command=command) for i in range(3)]
    t0 = time.monotonic()
    wait_until(lambda: cluster.first_step_after(t0, world_size=3), 90, "training at world size 3")
    victim = next(a for a in agents if a.group_rank() == 2)
    frozen = victim.freeze()
    frozen_at = time.monotonic()
    try:
        resumed = wait_until(lambda: cluster.first_step_after(frozen_at, world_size=2), 30,
                             "the survivors training at world size 2")
    finally:
        victim.thaw(frozen)
        victim.kill_node(with_workers=True)
    assert resumed[0] - frozen_at <= 5.0, f"survivors trained again only after {resumed[0] - frozen_at:.1f}s"
    survivors = [a for a in agents if a is not victim]
    for agent in survivors:
        assert "SIGKILL after" in agent.text(), agent.text()[-3000:]  # the handler never ran: killed
