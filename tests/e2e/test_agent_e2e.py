"""End-to-end: real etcd, real agent processes, real DDP workers (gloo), 3 nodes on one machine.

Each test reads what a user reads: the rank-0 worker's ``step N world_size W`` lines, the
agents' exit codes and log lines, ``elastic-agent status``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.harness import PYTHON, TRAIN, Cluster, alive, wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
FAIL = str(REPO / "tests" / "bin" / "always_fail.py")


def train(steps: int = 100000, every: int = 10) -> list[str]:
    return [PYTHON, str(TRAIN), "--steps", str(steps), "--checkpoint-every", str(every)]


def start_three(cluster: Cluster, steps: int = 100000, nproc: int = 1, **kw):
    agents = [cluster.start_agent(f"node-{i}", nproc=nproc, command=train(steps), **kw) for i in range(3)]
    return agents


def last_checkpoint_step(cluster: Cluster) -> int:
    from agent.worker.checkpoint import latest_step

    step = latest_step(cluster.checkpoint_dir)
    return -1 if step is None else step


def _kill_and_resume(cluster: Cluster, victim_rank: int) -> None:
    t0 = time.monotonic()
    agents = start_three(cluster)
    wait_until(lambda: cluster.first_step_after(t0, world_size=3), 90, "training at world size 3")
    wait_until(lambda: last_checkpoint_step(cluster) >= 10, 60, "a checkpoint at step 10 or later")
    victim = next(a for a in agents if a.group_rank() == victim_rank)
    checkpoint = last_checkpoint_step(cluster)
    killed_at = time.monotonic()
    orphans = victim.kill_node()
    assert orphans, "the victim had no workers running"
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") and alive(pid) for pid in orphans), 10,
               "the killed agent's workers to die with it")
    resumed = wait_until(lambda: cluster.first_step_after(killed_at, world_size=2), 60,
                         "training resumed at world size 2")
    # The survivors resumed from a checkpoint at least as new as the one before the kill,
    # and no step after the kill is below it.
    after = [step for t, step, ws in cluster.steps() if t > killed_at and ws == 2]
    assert min(after) >= checkpoint, (min(after), checkpoint)
    resumes = [s for t, s in cluster.resumes() if t > killed_at]
    assert resumes and min(resumes) >= checkpoint
    assert resumed[0] - killed_at < 30
    for agent in agents:
        if agent is not victim:
            assert agent.proc.poll() is None, agent.text()[-2000:]


def test_kill_a_node_survivors_resume_from_checkpoint(cluster):
    _kill_and_resume(cluster, victim_rank=2)


def test_kill_the_master_node_is_no_single_point_of_failure(cluster):
    _kill_and_resume(cluster, victim_rank=0)


def test_a_fourth_node_grows_the_world(cluster):
    t0 = time.monotonic()
    start_three(cluster)
    wait_until(lambda: cluster.first_step_after(t0, world_size=3), 90, "training at world size 3")
    added = time.monotonic()
    cluster.start_agent("node-3", nproc=1, command=train())
    wait_until(lambda: cluster.first_step_after(added, world_size=4), 60, "training at world size 4")
    # A planned change: the running workers drained at a step boundary, so no completed step
    # is trained again.
    completed = max(step for t, step, ws in cluster.steps() if ws == 3)
    resumed = min(step for t, step, ws in cluster.steps() if ws == 4)
    assert resumed == completed + 1, (completed, resumed)


def test_failing_worker_spends_the_job_wide_budget_then_every_agent_exits_1(cluster):
    agents = [cluster.start_agent(f"node-{i}", nproc=1, command=[PYTHON, FAIL], extra=["--max-restarts", "2"])
              for i in range(3)]
    codes = [a.wait(timeout=90) for a in agents]
    assert codes == [1, 1, 1], [a.text()[-1500:] for a in agents]
    for a in agents:
        assert "restart budget spent (2 of 2 used)" in a.text(), a.text()[-1500:]
    status = subprocess.run(
        [PYTHON, "-m", "agent", "status", "--etcd-endpoints", cluster.etcd.endpoint,
         "--job-id", cluster.job_id, "--json"], capture_output=True, text=True, timeout=30)
    snap = json.loads(status.stdout)
    # Counted once per job, not once per agent (3 agents x 2 would be 6).
    assert snap["restarts_used"] == 2
    assert snap["outcome"] == "failed"


def test_all_workers_finish_then_every_agent_exits_0_and_a_late_agent_too(cluster):
    agents = start_three(cluster, steps=15)
    codes = [a.wait(timeout=120) for a in agents]
    assert codes == [0, 0, 0], [a.text()[-1500:] for a in agents]
    late = cluster.start_agent("node-late", nproc=1, command=train(15))
    assert late.wait(timeout=30) == 0
    assert "already succeeded" in late.text()
    assert "started" not in late.text().split("already succeeded")[0].split("joined job")[-1]


def test_an_etcd_that_never_answers_is_waited_for_then_exit_1_not_2(tmp_path):
    began = time.monotonic()
    proc = subprocess.run([PYTHON, "-m", "agent", "start", "--job-id", "j", "--etcd-endpoints", "127.0.0.1:1",
                           "--metrics-port", "0", "--etcd-wait", "5", "--", PYTHON, "-c", "pass"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert 5 <= time.monotonic() - began < 30
    assert "waiting for etcd at 127.0.0.1:1" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "etcd at 127.0.0.1:1 did not answer for 5s (--etcd-wait)" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-nodes", "5", "--max-nodes", "4"], "--min-nodes (5) must be <= --max-nodes (4)"),
        (["--nproc-per-node", "x"], "--nproc-per-node"),
        ([], "missing command"),
        (["--log-dir", "/proc/x"], "--log-dir (/proc/x): cannot create or write there"),
        (["--checkpoint-dir", "/proc/x/ckpt"], "--checkpoint-dir (/proc/x/ckpt): cannot create or write there"),
    ],
)
def test_bad_flags_exit_2_with_one_line_and_leave_no_process(tmp_path, args, message):
    base = {"--job-id": "bad", "--etcd-endpoints": "127.0.0.1:1", "--metrics-port": "0"}
    flags: list[str] = []
    for key, value in base.items():
        if key not in args:
            flags += [key, value]
    command = [] if message == "missing command" else ["--", PYTHON, "-c", "pass"]
    proc = subprocess.run([PYTHON, "-m", "agent", "start", *flags, *args, *command],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    # Nothing left running from this directory (no workers, no embedded etcd).
    leftovers = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.readlink(f"/proc/{pid}/cwd") == str(tmp_path):
                    leftovers.append(pid)
            except OSError:
                pass
    assert leftovers == []
