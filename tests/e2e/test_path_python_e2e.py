"""A job started the way most users type it: ``source .venv/bin/activate`` and then
``elastic-agent start ... -- python train.py``. ``python`` is not a path: it is found on PATH
(the venv's bin first), as a shell would find it. Under the default ``--prewarm`` the node's
zygote is started, given up and started again (in-process recovery) by that name, so every
one of those starts must resolve it through the worker's PATH; a keeper that could not exec
it must never be taken for a zygote (its forks would run the script in the agent's own
bare interpreter: ``ModuleNotFoundError: No module named 'torch'``).

What a user notices: a kill -9 of one worker is recovered (a new worker joins the survivors
in process), the job finishes with exit 0, and no agent prints "cannot exec".
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.harness import Cluster
from tests.e2e.inprocess_log import inprocess_job
from tests.waiting import wait_until

pytestmark = pytest.mark.e2e

WAIT = 120.0
STEPS = 200  # ~0.1 s each: the kill lands by step ~25, the replacement joins with 15 s to spare


def test_python_from_path_in_process_recovers_a_killed_worker_and_finishes(cluster: Cluster) -> None:
    venv_bin = str(Path(sys.executable).parent)  # the activated venv: its bin first on PATH
    env = {"PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "/usr/bin:/bin")])}
    job = ["python", *inprocess_job(cluster)[1:]]
    job[job.index("--steps") + 1] = str(STEPS)
    agents = [cluster.start_agent(f"node-{i}", nproc=1, command=job, env=env) for i in range(2)]
    wait_until(lambda: [s for s in cluster.steps() if s[1] >= 20], WAIT, "training under way")
    victim = next(a for a in agents if a.group_rank() == 1)
    [pid] = victim.worker_pids()
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: victim.worker_pids() not in ([], [pid]), WAIT, "a replacement worker")
    wait_until(lambda: cluster.first_step_after(killed + 1.0, world_size=2), WAIT, "training again at world size 2")
    for agent in agents:
        assert agent.wait(timeout=WAIT) == 0, agent.text()[-4000:]
    for agent in agents:
        text = agent.text()
        assert "cannot exec" not in text, text[-4000:]
        assert "ModuleNotFoundError" not in text, text[-4000:]
    assert max(s for _, s, _ in cluster.steps()) == STEPS - 1, cluster.steps()[-5:]
