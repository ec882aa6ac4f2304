"""A slow rank is not a failed one (DESIGN invariant 8), end to end: a 2-node ``el.run`` job
whose global rank 0 pauses 65 s once, alone (an evaluation, a long save), while the other
rank waits in the step's all-reduce. Real etcd, real agents, real gloo workers.

The in-process loop used to form every group with a fixed 60 s timeout: the waiting rank's
collective timed out, its group was reported broken, a round opened and a restart was
charged to the budget (three such pauses failed the job). Now the group keeps the user's
timeout (torch's default here), and a dead peer is the agent's to notice."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import torchrun_env
from tests.e2e.harness import ELASTIC_AGENT, PYTHON, STEP_RE, TRAIN, Cluster

pytestmark = pytest.mark.e2e

LOOP = Path(__file__).resolve().parents[1] / "bin" / "inprocess_loop.py"
STEPS, PAUSE_AT, PAUSE_S = 5, 2, 65.0


def status(cluster: Cluster) -> dict:
    proc = subprocess.run([*ELASTIC_AGENT, "status", "--etcd-endpoints", cluster.etcd.endpoint,
                           "--job-id", cluster.job_id, "--json"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_rank_that_pauses_65s_alone_spends_no_restart_and_the_job_trains_on(cluster):
    command = [PYTHON, str(LOOP), str(STEPS), "0", str(PAUSE_AT), str(PAUSE_S)]
    agents = [cluster.start_agent(f"node-{i}", nproc=1, min_nodes=2, max_nodes=2, command=command,
                                  extra=["--max-restarts", "3"]) for i in range(2)]
    codes = [a.wait(timeout=PAUSE_S + 90) for a in agents]
    consoles = "\n".join(a.text()[-3000:] for a in agents)
    assert codes == [0, 0], consoles

    # The pause happened, where the other rank waited (its all-reduce of that step), and the
    # job then trained on to the end: every step once, in order, in the one first group.
    lines = [line for a in agents for line in list(a.lines)]
    paused = [line.t for line in lines if f"pausing at step {PAUSE_AT}" in line.text]
    steps = sorted((line.t, int(m.group(1)), int(m.group(2))) for line in lines if (m := STEP_RE.search(line.text)))
    assert len(paused) == 1, consoles
    assert [s for _, s, _ in steps] == list(range(STEPS)), steps
    assert {ws for _, _, ws in steps} == {2}, steps
    after_pause = next(t for t, s, _ in steps if s == PAUSE_AT)
    assert after_pause - paused[0] >= PAUSE_S - 1, (paused, steps)
    assert any(line.text.endswith("] done") for line in lines), consoles

    # Nothing was charged, and no round opened for it.
    snap = status(cluster)
    assert (snap["restarts_used"], snap["round"]) == (0, 1), snap
    assert not re.search(r"round \d+ opened", consoles), consoles


def test_el_run_under_plain_torchrun_trains_to_the_end(tmp_path):
    """No agent, no control file, round 0: nothing is "gone". The loop used to read the
    absent abort (0) as an abort of round 0 and wait forever for a re-form order."""
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(TRAIN), "--steps", "3", "--inprocess", "--step-time", "0"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=torchrun_env({**os.environ}, tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [int(m.group(1)) for m in STEP_RE.finditer(proc.stdout)] == [0, 1, 2], proc.stdout
