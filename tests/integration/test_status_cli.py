"""``elastic-agent status`` as a process against a real etcd: text, --json, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from agent.observe.goodput import NodeReport, Totals, persist
from rendezvous.etcd.store import EtcdStore
from rendezvous.net import free_port
from rendezvous.settings import Settings
from rendezvous.state import Assignment, Member, NodeRecord, RestartCount, RoundState

pytestmark = pytest.mark.usefixtures("etcd")


def status(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "status", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def seeded(etcd, job_id):
    s = Settings(job_id=job_id, min_nodes=1, max_nodes=2)
    store = EtcdStore(etcd.endpoint)
    try:
        lease = store.grant(30)
        store.put(s.node_key("n0"), NodeRecord("n0", "127.0.0.1", 2).encode(), lease=lease)
        closed = RoundState(3, "closed", "node_lost: n1", assignment=Assignment(
            3, (Member("n0", "127.0.0.1", 2),), "127.0.0.1", 29500))
        store.put(s.round_key, closed.encode())
        store.put(s.members_key(3), closed.encode_members())
        store.put(s.restarts_key, RestartCount(1, "worker_failure: n0 rank 1").encode())
        persist(store, s, "n0", NodeReport("n0", Totals(100.0, 75.0), state="running", last_step=42,
                                           last_step_time=time.time(), max_restarts=4, time=time.time()))
        yield etcd.endpoint, job_id
    finally:
        store.revoke(lease)
        store.delete_prefix(s.root)
        store.close()


def test_text_for_a_person(seeded) -> None:
    endpoint, job_id = seeded
    proc = status("--etcd-endpoints", endpoint, "--job-id", job_id)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"job {job_id}: running, round 3 closed (node_lost: n1)\n")
    assert "rank   0  n0" in out and "alive" in out
    assert "restarts: 1 of 4 used" in out
    assert "last step: 42" in out
    assert "goodput: 75.0%" in out


def test_json_for_scripts(seeded) -> None:
    endpoint, job_id = seeded
    proc = status("--etcd-endpoints", endpoint, "--job-id", job_id, "--json")
    assert proc.returncode == 0, proc.stderr
    snap = json.loads(proc.stdout)
    assert (snap["round"], snap["restarts_used"], snap["restarts_left"], snap["last_step"]) == (3, 1, 3, 42)
    assert snap["members"][0]["node_id"] == "n0" and snap["members"][0]["alive"] is True
    assert snap["members"][0]["registered_revisions_ago"] >= 0


def test_unknown_job_is_one_line_exit_2(etcd) -> None:
    proc = status("--etcd-endpoints", etcd.endpoint, "--job-id", "no-such-job-here")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "elastic-agent: error: --job-id ('no-such-job-here'): no such job in etcd "
        "(nothing under /elastic-agent/no-such-job-here/)"]


def test_unreachable_etcd_is_one_line_exit_2() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = status("--etcd-endpoints", endpoint, "--job-id", "x", "--timeout", "1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"elastic-agent: error: --etcd-endpoints ({endpoint}): etcd unreachable")
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 20


def test_bad_arguments_are_exit_2() -> None:
    proc = status("--job-id", "x")
    assert proc.returncode == 2 and "--etcd-endpoints" in proc.stderr
