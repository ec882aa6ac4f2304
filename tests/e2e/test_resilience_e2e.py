"""End-to-end: lose nothing. Graceful leave (SIGTERM, cloud notices), fencing, hang detection,
a truncated checkpoint. Real etcd, real agents, real DDP workers using the helper."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.e2e.harness import PYTHON, TRAIN, Cluster, alive, wait_until
from tests.fakes.metadata_server import MetadataServer

pytestmark = pytest.mark.e2e


def train(*extra: str, every: int = 10) -> list[str]:
    return [PYTHON, str(TRAIN), "--steps", "100000", "--checkpoint-every", str(every), *extra]


def _leave_loses_no_step(cluster: Cluster, trigger, extra_for_victim=(), env_for_victim=None) -> None:
    t0 = time.monotonic()
    agents = [cluster.start_agent(f"node-{i}", nproc=1, command=train(),
                                  extra=list(extra_for_victim) if i == 2 else None,
                                  env=env_for_victim if i == 2 else None) for i in range(3)]
    wait_until(lambda: cluster.first_step_after(t0, world_size=3), 90, "training at world size 3")
    wait_until(lambda: agents[2].group_rank() is not None, 10, "ranks")
    time.sleep(1.0)  # train a few steps past any periodic checkpoint
    at = time.monotonic()
    trigger(agents[2])
    assert agents[2].wait(timeout=60) == 3, agents[2].text()[-2000:]
    wait_until(lambda: cluster.first_step_after(at, world_size=2), 60, "training resumed at world size 2")
    completed = max(step for t, step, ws in cluster.steps() if ws == 3)
    resumed = min(step for t, step, ws in cluster.steps() if t > at and ws == 2)
    # Zero completed steps lost: training resumes right after the last step completed.
    assert resumed == completed + 1, (completed, resumed)
    assert "left job" in agents[2].text()


def test_sigterm_leaves_gracefully_and_loses_no_step(cluster):
    _leave_loses_no_step(cluster, lambda agent: agent.signal(signal.SIGTERM))


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_a_cloud_preemption_notice_leaves_gracefully_and_loses_no_step(cluster, cloud):
    with MetadataServer(clouds=(cloud,)) as fake:
        _leave_loses_no_step(
            cluster, lambda agent: fake.preempt(cloud, in_seconds=60),
            extra_for_victim=["--preemption-source", cloud],
            env_for_victim={"ELASTIC_AGENT_METADATA_URL": fake.url},
        )


def test_short_etcd_outage_restarts_nothing(cluster):
    agents = [cluster.start_agent(f"node-{i}", nproc=1, command=train()) for i in range(2)]
    t0 = time.monotonic()
    wait_until(lambda: cluster.first_step_after(t0, world_size=2), 90, "training")
    cluster.etcd.kill()
    time.sleep(1.5)  # the outage itself (an etcd restart): well within the default 10 s lease
    cluster.etcd.start()
    back = time.monotonic()
    wait_until(lambda: cluster.first_step_after(back + 3.0), 30, "training 3 s after etcd returned")
    for agent in agents:
        assert agent.proc.poll() is None
        assert "restarting the local workers" not in agent.text()
        assert "lost our lease" not in agent.text()
        assert "started 1 workers" in agent.text() and agent.text().count("started 1 workers") == 1


def test_long_etcd_outage_fences_workers_then_training_resumes(cluster):
    ttl, grace = 3.0, 2.0
    agents = [cluster.start_agent(f"node-{i}", nproc=1, command=train(),
                                  extra=["--lease-ttl", str(ttl), "--shutdown-timeout", str(grace)])
              for i in range(2)]
    t0 = time.monotonic()
    wait_until(lambda: cluster.first_step_after(t0, world_size=2), 90, "training")
    from agent.worker.checkpoint import latest_step

    wait_until(lambda: latest_step(cluster.checkpoint_dir) is not None, 60, "a first checkpoint")
    workers = {a.node_id: a.worker_pids() for a in agents}  # not the idle pre-started ones
    assert all(workers.values())
    cluster.etcd.kill()
    down = time.monotonic()
    # Fencing: every worker is stopped within the TTL plus the shutdown grace (and a little
    # for the agent's loop), though nobody could tell the agents anything.
    for agent in agents:
        wait_until(lambda agent=agent: "lost our lease" in agent.text(), ttl + grace + 2, "fencing")
        wait_until(lambda agent=agent: not any(Path(f"/proc/{p}").exists() and alive(p)
                                               for p in workers[agent.node_id]),
                   ttl + grace + 3 - (time.monotonic() - down), "workers stopped")
    assert time.monotonic() - down <= ttl + grace + 3
    checkpoint = latest_step(cluster.checkpoint_dir)
    cluster.etcd.start()
    back = time.monotonic()
    wait_until(lambda: cluster.first_step_after(back, world_size=2), 60, "training after etcd returned")
    resumed = [s for t, s in cluster.resumes() if t > back]
    assert resumed and resumed[0] == (checkpoint or 0) + 1


def test_a_silent_worker_is_restarted_after_the_hang_timeout(cluster):
    agents = [cluster.start_agent(f"node-{i}", nproc=1, command=train("--hang-at-step", "12"),
                                  extra=["--hang-timeout", "3"]) for i in range(2)]
    t0 = time.monotonic()
    wait_until(lambda: any("hang: local ranks 0 reported no progress" in a.text() for a in agents), 90,
               "a hang reported")
    hung = time.monotonic()
    wait_until(lambda: cluster.first_step_after(hung, world_size=2), 60, "training after the hang")
    text = "\n".join(a.text() for a in agents)
    assert "round 2 opened (hang:" in text or "opened round 2: hang:" in text
    assert hung - t0 < 90


def test_a_truncated_newest_checkpoint_is_skipped_with_a_warning(cluster):
    agents = [cluster.start_agent(f"node-{i}", nproc=1, command=train(every=5)) for i in range(2)]
    t0 = time.monotonic()
    from agent.worker.checkpoint import complete_checkpoints

    wait_until(lambda: len(complete_checkpoints(cluster.checkpoint_dir)) >= 2, 90, "two checkpoints")
    for agent in agents:
        agent.kill_node()
    done = complete_checkpoints(cluster.checkpoint_dir)
    newest, previous = done[-1], done[-2]
    victim = next(p for p in newest.path.iterdir() if p.is_file())
    victim.write_bytes(victim.read_bytes()[: max(1, victim.stat().st_size // 2)])
    again = time.monotonic()
    for i in range(2):
        cluster.start_agent(f"again-{i}", nproc=1, command=train(every=5))
    wait_until(lambda: cluster.first_step_after(again, world_size=2), 90, "training resumed")
    resumed = [s for t, s in cluster.resumes() if t > again]
    assert resumed and resumed[0] == previous.step + 1
    text = "\n".join(a.text() for a in cluster.agents.values())
    assert str(newest.step) in text and "skip" in text.lower(), text[-3000:]
    assert t0 < again
