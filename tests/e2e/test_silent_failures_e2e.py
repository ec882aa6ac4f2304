"""Silent failures and etcd trouble: a node frozen whole, an etcd leader killed, etcd down
while the agents boot, SIGTERM while etcd is away. Real etcd, real agents, real workers."""

from __future__ import annotations

import signal
import time

import pytest

from tests.e2e.harness import PYTHON, TRAIN, Cluster, wait_until
from tests.etcd_cluster import EtcdCluster

pytestmark = pytest.mark.e2e


def train() -> list[str]:
    return [PYTHON, str(TRAIN), "--steps", "100000", "--checkpoint-every", "10"]


def no_agent_traceback(agent) -> bool:
    return not any(line.text.startswith("Traceback") for line in agent.lines)


def test_a_frozen_node_is_replaced_within_seconds_and_rejoins_cleanly_when_thawed(cluster):
    agents = [cluster.start_agent(f"node-{i}", nproc=1, command=train()) for i in range(3)]
    t0 = time.monotonic()
    wait_until(lambda: cluster.first_step_after(t0, world_size=3), 90, "training at world size 3")
    victim = next(a for a in agents if a.group_rank() == 2)
    frozen = victim.freeze()  # no socket closes: the survivors' collectives just hang
    frozen_at = time.monotonic()
    resumed = wait_until(lambda: cluster.first_step_after(frozen_at, world_size=2), 30,
                         "the survivors training at world size 2")
    assert resumed[0] - frozen_at < 10, resumed[0] - frozen_at  # the figure itself is in make bench
    before_thaw = max(s for t, s, ws in cluster.steps() if ws == 2)
    thawed_at = time.monotonic()
    victim.thaw(frozen)
    # Back, it finds the job moved on: its stale workers are stopped, it joins as a newcomer.
    wait_until(lambda: cluster.first_step_after(thawed_at, world_size=3), 60, "the thawed node back in")
    after = [s for t, s, ws in cluster.steps() if t > thawed_at and ws == 3]
    assert min(after) >= before_thaw  # the job never went back to the frozen round's steps
    for agent in agents:
        assert agent.proc.poll() is None and no_agent_traceback(agent), agent.text()[-3000:]


def test_the_etcd_leader_killed_during_training_restarts_nothing():
    with EtcdCluster() as etcd, Cluster(job_id="leader-killed", endpoints=etcd.endpoints) as cluster:
        agents = [cluster.start_agent(f"node-{i}", nproc=1, command=train()) for i in range(2)]
        t0 = time.monotonic()
        wait_until(lambda: cluster.first_step_after(t0, world_size=2), 90, "training")
        leader = etcd.leader()
        assert leader is not None
        etcd.kill(leader)
        killed = time.monotonic()
        wait_until(etcd.leader, 30, "a new etcd leader")
        etcd.restart(leader)  # and the old leader comes back as a follower
        wait_until(lambda: cluster.first_step_after(killed + 12), 40, "12 s more of training")
        for agent in agents:
            text = agent.text()
            assert agent.proc.poll() is None, text[-2000:]
            assert "restarting the local workers" not in text and "lost our lease" not in text, text[-3000:]
            assert text.count("started 1 workers") == 1


def test_agents_booting_while_etcd_is_down_wait_for_it_then_train():
    with Cluster(job_id="etcd-late", start_etcd=False) as cluster:
        agents = [cluster.start_agent(f"node-{i}", nproc=1, command=train()) for i in range(2)]
        time.sleep(5)  # the outage itself: etcd pods still starting while the nodes boot
        for agent in agents:
            assert agent.proc.poll() is None, agent.text()[-2000:]
            assert "waiting for etcd at" in agent.text()
        up = time.monotonic()
        cluster.etcd.start()
        wait_until(lambda: cluster.first_step_after(up, world_size=2), 90, "training once etcd answers")


@pytest.mark.parametrize("when", ["outage", "fenced"])
def test_sigterm_while_etcd_is_away_leaves_with_exit_3(cluster, when):
    fast = ["--lease-ttl", "4"]  # only to keep the fenced case short
    agents = [cluster.start_agent(f"node-{i}", nproc=1, command=train(), extra=fast) for i in range(2)]
    t0 = time.monotonic()
    wait_until(lambda: cluster.first_step_after(t0, world_size=2), 90, "training")
    cluster.etcd.kill()
    leaver = agents[1]
    if when == "fenced":
        wait_until(lambda: "lost our lease" in leaver.text(), 20, "fencing")
    leaver.signal(signal.SIGTERM)
    assert leaver.wait(timeout=90) == 3, leaver.text()[-3000:]
    assert no_agent_traceback(leaver), leaver.text()[-3000:]


def test_a_full_etcd_is_reported_as_such_and_the_job_resumes_once_it_is_fixed():
    from rendezvous.errors import StoreFullError
    from rendezvous.etcd.server import etcd_binary
    from rendezvous.etcd.store import EtcdStore

    quota = str(2 * 1024 * 1024)
    with Cluster(job_id="nospace", etcd_args=("--quota-backend-bytes", quota)) as cluster:
        agents = [cluster.start_agent(f"node-{i}", nproc=1, command=train()) for i in range(3)]
        t0 = time.monotonic()
        wait_until(lambda: cluster.first_step_after(t0, world_size=3), 90, "training")
        filler = EtcdStore(cluster.endpoints)
        try:
            with pytest.raises(StoreFullError):
                for i in range(100):  # fill the quota until etcd raises its NOSPACE alarm
                    filler.put(f"/filler/{i}", b"x" * 256 * 1024)
            for i in range(100):
                filler.delete(f"/filler/{i}")
        finally:
            filler.close()
        victim = next(a for a in agents if a.group_rank() == 2)
        killed = time.monotonic()
        victim.kill_node()
        survivors = [a for a in agents if a is not victim]
        # Not a silent hang: the agents say what is wrong, and the metric says it too.
        wait_until(lambda: any("etcd is out of space" in a.text() for a in survivors), 30, "the NOSPACE report")
        wait_until(lambda: any("elastic_agent_etcd_out_of_space{" in line and line.endswith(" 1.0")
                               for a in survivors for line in a.scrape()[1].splitlines()), 30, "the metric at 1")
        assert cluster.first_step_after(killed + 5, world_size=2) is None  # no round could be written
        etcdctl = [str(etcd_binary().with_name("etcdctl")), "--endpoints", cluster.endpoints]
        import json
        import subprocess

        status = json.loads(subprocess.run([*etcdctl, "endpoint", "status", "-w", "json"], capture_output=True,
                                           text=True, timeout=30, check=True).stdout)
        revision = status[0]["Status"]["header"]["revision"]
        for fix in (["compact", str(revision)], ["defrag"], ["alarm", "disarm"]):  # docs/runbooks.md
            subprocess.run([*etcdctl, *fix], capture_output=True, text=True, timeout=30, check=True)
        fixed = time.monotonic()
        wait_until(lambda: cluster.first_step_after(fixed, world_size=2), 60, "training again once etcd is fixed")
        for agent in survivors:
            assert agent.proc.poll() is None and no_agent_traceback(agent), agent.text()[-3000:]
