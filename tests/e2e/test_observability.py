"""End-to-end observability: what Prometheus would scrape from real agents while a node dies and
the job recovers, and what /livez and /readyz answer during a long rendezvous.

Every wait has a deadline (wait_until); scrapes go to 127.0.0.1 only.
"""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import PYTHON, TRAIN, AgentProc, Cluster, wait_until

pytestmark = pytest.mark.e2e


def metrics(agent: AgentProc) -> dict[str, float]:
    """``name{label="v"}`` (job_id and node left out) -> value; {} when the agent does not answer."""
    try:
        code, body = agent.scrape()
    except OSError:
        return {}
    if code != 200:
        return {}
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k not in ("job_id", "node")}
            key = s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
            out[key] = s.value
    return out


def running_at(agent: AgentProc, nodes: int) -> dict[str, float] | None:
    m = metrics(agent)
    ok = m.get('elastic_agent_state{state="running"}') == 1 and m.get("elastic_agent_world_size_nodes") == nodes
    return m if ok else None


def restarts(m: dict[str, float]) -> dict[str, float]:
    prefix = 'elastic_agent_worker_group_restarts_total{reason="'
    return {k[len(prefix):-2]: v for k, v in m.items() if k.startswith(prefix) and v}


def train() -> list[str]:
    return [PYTHON, str(TRAIN), "--steps", "100000", "--checkpoint-every", "5"]


def test_node_killed_then_replaced_as_prometheus_sees_it(cluster: Cluster) -> None:
    agents = [cluster.start_agent(f"node-{i}", nproc=1, command=train()) for i in range(3)]
    survivor = agents[0]
    before = wait_until(lambda: running_at(survivor, 3), 60, "the survivor running at 3 nodes")
    assert before["elastic_agent_world_size_workers"] == 3
    assert restarts(before) == {}
    stepping = wait_until(lambda: (m := metrics(survivor)).get("elastic_agent_last_step", -1) >= 3 and m, 60,
                          "a few steps reported")
    assert survivor.scrape("/readyz")[0] == 200

    agents[2].kill_node()
    after_kill = wait_until(lambda: running_at(survivor, 2), 45, "the survivor running at 2 nodes")
    assert after_kill["elastic_agent_world_size_workers"] == 2
    # The survivors' own workers failed first (their peer's sockets closed), but the next round
    # lacks the dead member: that is the node's loss, as the restart budget also sees it.
    assert restarts(after_kill) == {"node_lost": 1}, restarts(after_kill)
    assert after_kill["elastic_agent_restart_duration_seconds_count"] == 1
    assert after_kill["elastic_agent_rendezvous_rounds_total"] == 2
    progressed = wait_until(
        lambda: (m := metrics(survivor)).get("elastic_agent_last_step", -1) > stepping["elastic_agent_last_step"] and m,
        45, "steps after the restart")

    cluster.start_agent("node-3", nproc=1, command=train())  # a replacement node joins
    recovered = wait_until(lambda: running_at(survivor, 3), 45, "the world back at 3 nodes")
    assert restarts(recovered) == {"node_lost": 1, "scale_up": 1}, restarts(recovered)
    final = wait_until(
        lambda: (m := metrics(survivor)).get("elastic_agent_last_step", -1) > progressed["elastic_agent_last_step"]
        and m.get("elastic_agent_productive_seconds_total", 0) > 0 and m, 45, "steps at 3 nodes again")

    assert 0 < final["elastic_agent_goodput_ratio"] < 1
    assert final["elastic_agent_last_step_timestamp_seconds"] <= time.time() + 1
    elapsed = final["elastic_agent_elapsed_seconds_total"]
    accounted = final["elastic_agent_productive_seconds_total"] + sum(
        v for k, v in final.items() if k.startswith("elastic_agent_badput_seconds_total"))
    assert 0 < accounted <= elapsed + 1e-6
    assert final['elastic_agent_badput_seconds_total{reason="startup"}'] > 0
    assert final['elastic_agent_badput_seconds_total{reason="rendezvous"}'] > 0


def test_livez_stays_up_while_waiting_for_a_missing_node_and_readyz_follows_the_workers(cluster: Cluster) -> None:
    sleeper = [PYTHON, "-c", "import time; time.sleep(600)"]
    first = cluster.start_agent("node-a", min_nodes=2, max_nodes=2, nproc=1, command=sleeper)
    wait_until(lambda: metrics(first).get('elastic_agent_state{state="rendezvous"}') == 1, 30,
               "the first agent waiting in the rendezvous")
    # Several seconds of waiting for a node that is not there: live all along, never ready.
    deadline = time.monotonic() + 4
    checks = 0
    while time.monotonic() < deadline:
        assert first.scrape("/livez")[0] == 200
        code, body = first.scrape("/readyz")
        assert code == 503 and "rendezvous" in body, body
        checks += 1
        time.sleep(0.25)  # pacing the probes, as a kubelet would; nothing waits on it
    assert checks >= 8
    waited = metrics(first)
    # One node alive of the two needed: that wait is "below min nodes" badput.
    assert waited['elastic_agent_badput_seconds_total{reason="below_min_nodes"}'] > 0
    assert (waited['elastic_agent_badput_seconds_total{reason="below_min_nodes"}']
            + waited['elastic_agent_badput_seconds_total{reason="rendezvous"}']) >= 3

    cluster.start_agent("node-b", min_nodes=2, max_nodes=2, nproc=1, command=sleeper)
    wait_until(lambda: first.scrape("/readyz")[0] == 200, 30, "/readyz 200 once workers run")
    m = metrics(first)
    assert m['elastic_agent_state{state="running"}'] == 1 and m["elastic_agent_workers_running"] == 1
    assert first.scrape("/livez")[0] == 200
