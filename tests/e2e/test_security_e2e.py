"""End-to-end: a job locked down as docs/security.md says (etcd over mTLS, authentication on,
the job's user limited to its key prefix, tokens that expire every few seconds) trains, loses a
node to ``kill -9``, and trains again at world size 2. Then every log, worker environment,
metrics page, ``status`` output and etcd record of that job is searched for the password and
the private keys: none may appear."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rendezvous.etcd.auth import Credentials
from rendezvous.etcd.store import EtcdStore
from tests import tls
from tests.e2e.harness import PYTHON, TRAIN, Cluster, wait_until

pytestmark = pytest.mark.e2e

JOB = "llama-ft"  # the job docs/security.md locks down
PASSWORD = "e2e-Pa55word-that-is-never-shown"
TOKEN_TTL = "3"  # etcd --auth-token-ttl: the agents' tokens expire again and again during the run


@dataclass
class Run:
    """What the run showed: when it trained at which world size, and every text it left."""

    trained_at_3: float = 0.0
    killed_at: float = 0.0
    trained_at_2: float = 0.0
    victim_exit: int | None = None
    texts: dict[str, str] = field(default_factory=dict)  # where -> what was there
    secrets: list[str] = field(default_factory=list)
    ca: Path = Path()


@pytest.fixture(scope="module")
def secured_run():
    with tls.pki() as pki:
        etcd_pair, root = pki.issue("etcd", server=True), pki.issue("root")
        nodes = [pki.issue(f"node-{i}") for i in range(3)]
        with Cluster(job_id=JOB, etcd_tls=tls.server_tls(pki, etcd_pair),
                     etcd_args=("--auth-token-ttl", TOKEN_TTL)) as cluster:
            tls.lock_down(cluster.etcd, pki, root, PASSWORD, pki.dir)
            run = Run(secrets=[PASSWORD, *(line for pair in (etcd_pair, root, *nodes) for line in tls.key_material(pair))],
                      ca=pki.ca)
            _train_lose_a_node_and_recover(cluster, pki, nodes, run)
            _collect(cluster, pki, root, nodes[0], run)
        yield run


def _agent_settings(pki: tls.Pki, node: tls.Pair, i: int) -> tuple[list[str], dict[str, str]]:
    """Every way to give the settings, one per node: flags, variables, a password file."""
    tls_flags = ["--etcd-cacert", str(pki.ca), "--etcd-cert", str(node.cert), "--etcd-key", str(node.key)]
    if i == 0:
        return [*tls_flags, "--etcd-user", JOB], {"ELASTIC_AGENT_ETCD_PASSWORD": PASSWORD}
    password_file = ["--etcd-password-file", str(pki.dir / f"{JOB}.password")]
    if i == 1:
        return ["--etcd-user", JOB, *password_file], {"ELASTIC_AGENT_ETCD_CACERT": str(pki.ca),
                                                      "ELASTIC_AGENT_ETCD_CERT": str(node.cert),
                                                      "ELASTIC_AGENT_ETCD_KEY": str(node.key)}
    return [*tls_flags, "--etcd-user", JOB, *password_file], {}


def _train_lose_a_node_and_recover(cluster: Cluster, pki: tls.Pki, nodes: list[tls.Pair], run: Run) -> None:
    t0 = time.monotonic()
    agents = []
    for i, node in enumerate(nodes):
        extra, env = _agent_settings(pki, node, i)
        agents.append(cluster.start_agent(f"node-{i}", min_nodes=2, max_nodes=3, nproc=1, extra=extra, env=env,
                                          command=[PYTHON, str(TRAIN), "--steps", "100000", "--checkpoint-every", "10"]))
    run.trained_at_3 = wait_until(lambda: cluster.first_step_after(t0, world_size=3), 90, "training at world size 3")[0]
    run.killed_at = time.monotonic()
    agents[2].kill_node()  # kill -9
    run.victim_exit = agents[2].proc.returncode
    run.trained_at_2 = wait_until(lambda: cluster.first_step_after(run.killed_at, world_size=2), 60,
                                  "training again at world size 2")[0]


def _collect(cluster: Cluster, pki: tls.Pki, root: tls.Pair, node: tls.Pair, run: Run) -> None:
    """Everything a user, an operator or another process could read about the job."""
    survivors = [a for a in cluster.agents.values() if a.proc.poll() is None]
    for agent in survivors:
        run.texts[f"{agent.node_id} /metrics"] = agent.scrape()[1]
        for pid in agent.worker_pids():
            run.texts[f"{agent.node_id} worker {pid} environment"] = Path(f"/proc/{pid}/environ").read_bytes().decode(
                errors="replace").replace("\0", "\n")
    tls_flags = ["--etcd-cacert", str(pki.ca), "--etcd-cert", str(node.cert), "--etcd-key", str(node.key)]
    status = [sys.executable, "-m", "agent", "status", "--etcd-endpoints", cluster.etcd.url, "--job-id", JOB,
              "--etcd-user", JOB, *tls_flags]
    for name, args, password in (("status", [], PASSWORD), ("status --json", ["--json"], PASSWORD),
                                 ("status, wrong password", [], "wrong-" + PASSWORD)):
        proc = subprocess.run(status + args, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "ELASTIC_AGENT_ETCD_PASSWORD": password})
        run.texts[name] = proc.stdout + proc.stderr
    admin = EtcdStore(cluster.etcd.url, credentials=Credentials(cacert=str(pki.ca), cert=str(root.cert),
                                                                 key=str(root.key)))
    try:
        records, _ = admin.get_prefix("/")
    finally:
        admin.close()
    run.texts["etcd records"] = "\n".join(f"{kv.key} {kv.value.decode(errors='replace')}" for kv in records)
    for agent in cluster.agents.values():
        if agent.proc.poll() is None:
            agent.kill_node()
        run.texts[f"{agent.node_id} console"] = agent.text()
    for path in sorted(cluster.workdir.rglob("*")):
        if path.is_file() and cluster.etcd.data_dir not in str(path):  # etcd's own storage is etcd's
            run.texts[str(path.relative_to(cluster.workdir))] = path.read_bytes().decode(errors="replace")


def test_a_locked_down_job_trains_over_mtls_and_recovers_from_kill_9(secured_run) -> None:
    run = secured_run
    assert run.victim_exit == -9
    assert run.trained_at_2 - run.killed_at < 30, run.trained_at_2 - run.killed_at
    console = run.texts["node-0 console"]
    assert f"TLS (CA {run.ca}, client certificate {run.ca.parent / 'node-0.crt'}), as etcd user '{JOB}' " \
           "(password given)" in console  # how it connects, logged first
    assert "elastic-agent: error" not in console
    assert f"/elastic-agent/{JOB}/round" in run.texts["etcd records"]
    assert run.texts["status"].startswith(f"job {JOB}: running"), run.texts["status"]
    assert run.texts["status, wrong password"].startswith("elastic-agent: error: etcd user 'llama-ft': "
                                                          "authentication failed")


def test_no_password_or_key_in_any_log_environment_metrics_status_or_record(secured_run) -> None:
    run = secured_run
    assert len(run.texts) > 10 and any("environment" in where for where in run.texts)
    found = [(where, secret[:12]) for where, text in run.texts.items() for secret in run.secrets if secret in text]
    assert found == []
    assert not [where for where, text in run.texts.items() if "ELASTIC_AGENT_ETCD_PASSWORD=" in text]
