"""In-memory snapshots end to end: every worker of the job killed at once (nobody holds the
state in memory any more), and the job resumes from the snapshot its node kept in shared
memory, not from the disk checkpoint; once the job has succeeded the snapshots are gone.
An agent started as the README shows (the harness), docs/examples/train_ddp.py --inprocess."""

from __future__ import annotations

import os
import signal
import time

import pytest

from agent.daemon.local import Layout
from tests.e2e.harness import PYTHON, TRAIN, Cluster, wait_until

pytestmark = pytest.mark.e2e

WAIT = 90.0


def snapshot_dir(cluster: Cluster, node_id: str):
    """Where the agent keeps this node's snapshots (its own rule, not a copy of it)."""
    return Layout(command=(), nproc=1, node_id=node_id, job_id=cluster.job_id, max_restarts=0, shutdown_timeout=0,
                  log_dir=cluster.workdir / "elastic-agent-logs", checkpoint_dir=None).snapshot_dir


def test_all_workers_killed_resume_from_the_nodes_snapshot_and_the_snapshots_go_with_the_job(cluster):
    # No disk checkpoint: only a snapshot can keep the steps.
    job = [PYTHON, str(TRAIN), "--steps", "60", "--checkpoint-every", "0", "--inprocess"]
    agent = cluster.start_agent("n0", min_nodes=1, max_nodes=1, nproc=2, command=job)
    wait_until(lambda: any(step >= 25 for _, step, _ in cluster.steps()), WAIT, "step 25")
    assert (snapshot_dir(cluster, "n0") / "own-0").is_file()
    workers = agent.worker_pids()
    killed_at = time.monotonic()
    last = max(step for _, step, _ in cluster.steps())
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    first = wait_until(lambda: cluster.first_step_after(killed_at + 0.01), WAIT, "a step after the kill")
    # The step in flight (and, at worst, the one whose snapshot was still being written) is
    # trained again; everything before it comes back from shared memory, not from step 0.
    assert last - 1 <= first[1] <= last + 1, (last, first)
    assert set(agent.worker_pids()).isdisjoint(workers)  # new processes: nobody held the state
    assert agent.wait(WAIT) == 0
    assert not snapshot_dir(cluster, "n0").exists()
