"""Many hosts, one filesystem: agents started as the README shows, in ONE working directory
(the default --log-dir shared by every node) with one shared checkpoint directory, and
workers that take uneven time to stop. Real etcd, real agents, real workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.harness import ELASTIC_AGENT, PYTHON, TRAIN, Cluster, alive, wait_until

pytestmark = pytest.mark.e2e

BIN = Path(__file__).resolve().parents[1] / "bin"
FAIL_OR_WAIT = [PYTHON, str(BIN / "fail_or_wait.py")]


def train(every: int = 10) -> list[str]:
    return [PYTHON, str(TRAIN), "--steps", "100000", "--checkpoint-every", str(every)]


def status(cluster: Cluster) -> dict:
    proc = subprocess.run([*ELASTIC_AGENT, "status", "--etcd-endpoints", cluster.etcd.endpoint,
                           "--job-id", cluster.job_id, "--json"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def attempts(cluster: Cluster, node: str) -> list[Path]:
    return sorted((cluster.workdir / "elastic-agent-logs" / cluster.job_id / node).iterdir())


def test_join_sigterm_and_kill_in_one_working_directory_every_agent_survives_and_keeps_its_logs(cluster):
    agents = {f"node-{i}": cluster.start_agent(f"node-{i}", nproc=1, command=train()) for i in range(3)}
    t0 = time.monotonic()
    wait_until(lambda: cluster.first_step_after(t0, world_size=3), 90, "training at world size 3")

    # A 4th node joins. Its agent used to rmtree the shared attempt_0 directory, and the
    # running agents crashed writing their control files there.
    joined = time.monotonic()
    agents["node-3"] = cluster.start_agent("node-3", nproc=1, command=train())
    wait_until(lambda: cluster.first_step_after(joined, world_size=4), 60, "training at world size 4")
    completed = max(s for t, s, ws in cluster.steps() if ws == 3)
    assert min(s for t, s, ws in cluster.steps() if ws == 4) == completed + 1  # nothing lost

    # A node is preempted (SIGTERM): it drains, leaves with 3, nothing is lost.
    leaver = agents["node-1"]
    leaving = time.monotonic()
    leaver.signal(signal.SIGTERM)
    assert leaver.wait(timeout=60) == 3, leaver.text()[-2000:]
    wait_until(lambda: cluster.first_step_after(leaving, world_size=3), 60, "training at 3 after the leave")
    before = max(s for t, s, ws in cluster.steps() if ws == 4)
    after = min(s for t, s, ws in cluster.steps() if t > leaving and ws == 3)
    assert after == before + 1, ([(round(t - leaving, 2), s, ws) for t, s, ws in cluster.steps() if t > leaving - 2],
                                 [line.text for a in agents.values() for line in a.lines
                                  if "drained" in line.text or "resumed" in line.text])

    # A node is killed: the others go on from at least the last checkpoint.
    victim = agents["node-2"]
    killed = time.monotonic()
    victim.kill_node()
    wait_until(lambda: cluster.first_step_after(killed, world_size=2), 60, "training at 2 after the kill")

    for node in ("node-0", "node-3"):
        assert agents[node].proc.poll() is None, agents[node].text()[-3000:]
        # The agent itself never crashed (its workers' tracebacks after the kill carry a prefix).
        assert not any(line.text.startswith("Traceback") for line in agents[node].lines), agents[node].text()[-3000:]
    # Every node's log of every attempt it ran is there, in a directory of its own.
    expected_attempts = {"node-0": 4, "node-1": 2, "node-2": 3, "node-3": 3}
    for node, count in expected_attempts.items():
        runs = attempts(cluster, node)
        assert len(runs) == count, (node, [r.name for r in runs])
        for run in runs:
            assert (run / "0" / "stdout.log").exists() and (run / "0" / "stderr.log").exists(), run
    everything = "".join((run / "0" / "stdout.log").read_text() for node in expected_attempts
                         for run in attempts(cluster, node))
    for said in ("starting from step 0", "drained at step", "resumed from step"):
        assert said in everything, said


def test_a_node_slow_to_stop_costs_one_restart_charged_once(cluster):
    marker = cluster.workdir / "failed-once"
    env = {"FAIL_NODE": "node-0", "FAIL_AFTER": "3", "FAIL_ONCE_MARKER": str(marker)}
    agents = [cluster.start_agent(f"node-{i}", nproc=1, command=FAIL_OR_WAIT,
                                  env={**env, "STOP_DELAY": "3" if i == 2 else "0"}) for i in range(3)]
    wait_until(lambda: all("running round 2" in a.text() for a in agents), 60, "every node in round 2")
    settled = time.monotonic()
    # node-2's workers took 3 s to stop, far longer than --last-call: it still made round 2
    # (no scale-up round opened behind it) and the one failure was charged once.
    wait_until(lambda: time.monotonic() - settled > 5, 10, "5 quiet seconds")
    snap = status(cluster)
    assert (snap["round"], snap["world_size_nodes"], snap["restarts_used"]) == (2, 3, 1), snap
    assert not any("running round 3" in a.text() for a in agents)


def test_an_always_failing_script_with_uneven_stop_times_spends_the_budget(cluster):
    env = {"FAIL_NODE": "node-0", "FAIL_AFTER": "0.5"}
    agents = [cluster.start_agent(f"node-{i}", nproc=1, command=FAIL_OR_WAIT, extra=["--max-restarts", "2"],
                                  env={**env, "STOP_DELAY": "2" if i == 2 else "0"}) for i in range(3)]
    codes = [a.wait(timeout=120) for a in agents]
    assert codes == [1, 1, 1], [a.text()[-1500:] for a in agents]
    snap = status(cluster)
    assert snap["restarts_used"] == 2 and snap["outcome"] == "failed", snap
    # After the first failure no scale-up round ever had to bring the slow node back (the
    # first round alone may miss a node that started late: that is the last call's business).
    lines = sorted((line.t, line.text) for a in agents for line in a.lines)
    first_failure = next(t for t, text in lines if "worker_failure" in text)
    regrown = [text for t, text in lines if t > first_failure and "opened (scale_up" in text]
    assert regrown == [], regrown


def test_a_trainer_behind_bash_dies_with_its_killed_agent(cluster):
    script = f"{PYTHON} {BIN / 'ignore_sigterm.py'}; echo trainer ended"
    agent = cluster.start_agent("node-0", min_nodes=1, max_nodes=1, nproc=1, command=["bash", "-c", script],
                                extra=["--no-prewarm"])
    wait_until(lambda: "[node-0/0] ready" in agent.text(), 60, "the trainer to start")
    below = agent.descendants()
    assert len(below) >= 3, below  # the keeper, bash, and the trainer bash started
    agent.kill_node()
    wait_until(lambda: not any(alive(pid) for pid in below), 10, "everything below the agent to die")


def test_workers_get_absolute_paths_even_from_a_relative_log_dir(cluster):
    probe = (f"import os, json; print('ENV', json.dumps({{k: os.environ[k] for k in os.environ "
             f"if k.startswith(('TORCHELASTIC_', 'ELASTIC_AGENT_'))}}), flush=True); import time; time.sleep(60)")
    agent = cluster.start_agent("node-0", min_nodes=1, max_nodes=1, nproc=1, command=[PYTHON, "-c", probe],
                                extra=["--log-dir", "rel/logs"])
    line = wait_until(lambda: next((x.text for x in agent.lines if "ENV {" in x.text), None), 60, "the env line")
    env = json.loads(line.split("ENV ", 1)[1])
    for name in ("TORCHELASTIC_ERROR_FILE", "ELASTIC_AGENT_PROGRESS_FILE", "ELASTIC_AGENT_CONTROL_FILE",
                 "ELASTIC_AGENT_CHECKPOINT_DIR"):
        assert os.path.isabs(env[name]), (name, env[name])
    assert env["TORCHELASTIC_ERROR_FILE"].startswith(str(cluster.workdir / "rel" / "logs" / cluster.job_id / "node-0"))
    assert env["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
