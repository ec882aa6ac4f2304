"""The network between nodes, end to end: three agents on distinct loopback addresses
(--node-addr 127.0.0.1-3), real etcd, real workers; one node's link to its peers is cut while
etcd still reaches it (tests-only hook ELASTIC_AGENT_TEST_CUT_FILE: while the file exists the
node neither answers its peers' probes nor hears their answers).

What a user notices: its ring neighbours open a round without it within seconds (reason
``unreachable``; its presence lease is alive, so nothing else would ever remove it), the job
trains on at world size 2, the cut node stays out (log line, metric, ``elastic-agent status``)
until its link is back, and then it joins again.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from tests.e2e.harness import ELASTIC_AGENT, PYTHON, TRAIN, AgentProc, Cluster, wait_until

pytestmark = pytest.mark.e2e

WAIT = 120.0  # generous: the machine may be shared with other test runs
REMOVED_WITHIN = 6.0  # cut -> round opened without it; the probe verdict alone is 0.8 s
FAILURES_RE = re.compile(r"^elastic_agent_connectivity_check_failures_total\{[^}]*\} (\S+)$", re.M)


def status(cluster: Cluster) -> dict:
    proc = subprocess.run([*ELASTIC_AGENT, "status", "--etcd-endpoints", cluster.etcd.endpoint,
                           "--job-id", cluster.job_id, "--json"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def failures(agent: AgentProc) -> float | None:
    try:
        code, text = agent.scrape()
    except OSError:
        return None
    m = FAILURES_RE.search(text) if code == 200 else None
    return float(m.group(1)) if m else None


def test_a_node_its_peers_cannot_reach_is_removed_kept_out_and_readmitted_once_reachable(cluster):
    cut = cluster.workdir / "cut-node-2"
    command = [PYTHON, str(TRAIN), "--steps", "100000", "--checkpoint-every", "10"]
    agents = {f"node-{i}": cluster.start_agent(f"node-{i}", nproc=1, command=command, node_addr=f"127.0.0.{i + 1}",
                                               env={"ELASTIC_AGENT_TEST_CUT_FILE": str(cut)} if i == 2 else None)
              for i in range(3)}
    t0 = time.monotonic()
    wait_until(lambda: cluster.first_step_after(t0, world_size=3), WAIT, "training at world size 3")

    cut.touch()
    at = time.monotonic()
    wait_until(lambda: any("node-2 cut off from its peers" in a.text() for a in agents.values()),
               REMOVED_WITHIN, "a round opened without node-2 (unreachable)")
    wait_until(lambda: cluster.first_step_after(at, world_size=2), WAIT, "training at world size 2")
    kept = agents["node-2"]
    wait_until(lambda: "kept out of the job (unreachable)" in kept.text(), WAIT, "node-2 saying it is kept out")
    assert wait_until(lambda: failures(kept), WAIT, "node-2's check failure metric") == 1.0
    snap = wait_until(lambda: (s := status(cluster)) and any(r["kept_out"] for r in s["network"]) and s,
                      WAIT, "status showing node-2 kept out")
    assert [r["node_id"] for r in snap["network"] if r["kept_out"]] == ["node-2"], snap["network"]
    assert sorted(m["node_id"] for m in snap["members"]) == ["node-0", "node-1"], snap["members"]
    # Not readmitted while it still fails: the job stays at two nodes past a scale-up cool-down.
    since = time.monotonic()
    wait_until(lambda: time.monotonic() - since > 4 and cluster.first_step_after(since + 4, world_size=2),
               WAIT, "training on at world size 2 with node-2 kept out")
    assert not cluster.first_step_after(at + 1, world_size=3)

    cut.unlink()
    back = time.monotonic()
    wait_until(lambda: cluster.first_step_after(back, world_size=3), WAIT, "node-2 readmitted: world size 3")
    assert "answered steadily for 3s: joining again" in kept.text()
    assert all(a.proc.poll() is None for a in agents.values())


def test_a_node_cut_off_from_the_start_fails_the_check_before_training_and_the_others_train(cluster):
    """The first round has nobody to be admitted by: the members' check before their workers
    start is what finds the node, and the round after goes on without it."""
    cut = cluster.workdir / "cut-node-2"
    cut.touch()
    agents = {f"node-{i}": cluster.start_agent(f"node-{i}", nproc=1, node_addr=f"127.0.0.{i + 1}",
                                               min_nodes=2, max_nodes=3,
                                               env={"ELASTIC_AGENT_TEST_CUT_FILE": str(cut)} if i == 2 else None)
              for i in range(3)}
    t0 = time.monotonic()
    wait_until(lambda: cluster.first_step_after(t0, world_size=2), WAIT, "training at world size 2")
    wait_until(lambda: "kept out of the job (unreachable)" in agents["node-2"].text(), WAIT, "node-2 kept out")
    assert any("do not answer probes" in a.text() for a in agents.values())
    assert not cluster.first_step_after(t0, world_size=3)
    assert all(a.proc.poll() is None for a in agents.values())


def test_a_frozen_node_is_removed_by_the_probes_before_its_presence_lease_runs_out(cluster):
    agents = {f"node-{i}": cluster.start_agent(f"node-{i}", nproc=1, node_addr=f"127.0.0.{i + 1}")
              for i in range(3)}
    t0 = time.monotonic()
    wait_until(lambda: cluster.first_step_after(t0, world_size=3), WAIT, "training at world size 3")
    frozen = agents["node-2"].freeze()
    try:
        at = time.monotonic()
        # --presence-ttl is 2 s: the round that removes it must come from the probes, well before.
        wait_until(lambda: any("node-2 cut off from its peers" in a.text() for a in agents.values()),
                   REMOVED_WITHIN, "a round opened without node-2 (unreachable)")
        # (Logged only by the node whose round opened: a presence expiry first would have won the
        # compare-and-swap and this line would never be written.)
        wait_until(lambda: cluster.first_step_after(at, world_size=2), WAIT, "training at world size 2")
    finally:
        agents["node-2"].thaw(frozen)
