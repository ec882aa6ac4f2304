"""PyTorch's DDP tutorial, in its shape (docs/examples/ddp_tutorial.py: a Trainer class, the
DDP model alive at ``destroy_process_group()``, gloo on CPU), run as a user would: 3 agents,
DEFAULT flags (so ``--prewarm``: the workers are forked from the node's zygote). It used to
hang at exit in 8 of 20 runs (a deadlock in torch's gloo teardown that the forked workers'
fast exit ran into; keeper_main.let_gloo_settle_before_destroy). ``make soak-tutorial`` runs
it 50 times."""

from __future__ import annotations

import pytest

from tests.e2e.harness import PYTHON, REPO, Cluster, alive

pytestmark = pytest.mark.e2e

TUTORIAL = REPO / "docs" / "examples" / "ddp_tutorial.py"
WAIT = 120.0


def test_the_ddp_tutorial_as_three_agents_with_default_flags_finishes(cluster: Cluster) -> None:
    snapshot = cluster.workdir / "snapshot.pt"
    command = [PYTHON, str(TUTORIAL), "3", "1", "--batch_size", "32", "--snapshot_path", str(snapshot)]
    agents = [cluster.start_agent(f"node-{i}", min_nodes=3, max_nodes=3, nproc=1, command=command)
              for i in range(3)]
    for agent in agents:
        assert agent.wait(timeout=WAIT) == 0, agent.text()[-3000:]
    text = "".join(a.text() for a in agents)
    for rank in range(3):
        assert f"[RANK{rank}] Epoch 2 |" in text, text[-3000:]
    assert "Epoch 2 | Training snapshot saved" in text
    assert snapshot.exists()


def test_a_node_whose_worker_lingers_after_every_other_finished_is_ended_after_the_bound(cluster: Cluster) -> None:
    # Global rank 2 trains, then never exits (as a worker deadlocked in teardown would). The
    # others are done; after --exit-barrier-timeout the job ends as succeeded, every agent
    # exits 0, and the lingering worker is stopped.
    script = REPO / "tests" / "bin" / "linger_after_training.py"
    agents = [cluster.start_agent(f"node-{i}", min_nodes=3, max_nodes=3, nproc=1, command=[PYTHON, str(script), "2"],
                                  extra=["--exit-barrier-timeout", "3"]) for i in range(3)]
    for agent in agents:
        assert agent.wait(timeout=WAIT) == 0, agent.text()[-3000:]
    lingerer = next(a for a in agents if "lingering" in a.text())
    warned = [a for a in agents if f"node {lingerer.node_id}'s workers still run" in a.text()]
    assert warned and lingerer not in warned, [a.text()[-1500:] for a in agents]
    assert "--exit-barrier-timeout 3s" in warned[0].text()
    assert "job e2e" in lingerer.text() and "succeeded" in lingerer.text(), lingerer.text()[-2000:]
    assert not any(alive(pid) for pid in lingerer.worker_pids())
