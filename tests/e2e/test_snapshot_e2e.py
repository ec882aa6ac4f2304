"""In-memory snapshots end to end: every worker of the job killed at once (nobody holds the
state in memory any more), and the job resumes from the snapshot its node kept in shared
memory, not from the disk checkpoint; once the job has succeeded the snapshots are gone.
An agent started as the README shows (the harness), docs/examples/train_ddp.py --inprocess."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import time
from pathlib import Path

import pytest

from agent.daemon.workers.local import Layout
from tests.e2e.harness import PYTHON, TRAIN, Cluster, consoles, wait_until

pytestmark = pytest.mark.e2e

WAIT = 90.0


def snapshot_dir(cluster: Cluster, node_id: str):
    """Where the agent keeps this node's snapshots (its own rule, not a copy of it)."""
    return Layout(command=(), nproc=1, node_id=node_id, job_id=cluster.job_id, max_restarts=0, shutdown_timeout=0,
                  log_dir=cluster.workdir / "elastic-agent-logs", checkpoint_dir=None).snapshot_dir


def test_all_workers_killed_resume_from_the_nodes_snapshot_and_the_snapshots_go_with_the_job(cluster):
    # No disk checkpoint: only a snapshot can keep the steps.
    job = [PYTHON, str(TRAIN), "--steps", "60", "--checkpoint-every", "0", "--inprocess"]
    agent = cluster.start_agent("n0", min_nodes=1, max_nodes=1, nproc=2, command=job)
    wait_until(lambda: any(step >= 25 for _, step, _ in cluster.steps()), WAIT, "step 25")
    assert (snapshot_dir(cluster, "n0") / "own-0").is_file()
    workers = agent.worker_pids()
    killed_at = time.monotonic()
    last = max(step for _, step, _ in cluster.steps())
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    first = wait_until(lambda: cluster.first_step_after(killed_at + 0.01), WAIT, "a step after the kill")
    # The step in flight (and, at worst, the one whose snapshot was still being written) is
    # trained again; everything before it comes back from shared memory, not from step 0.
    assert last - 1 <= first[1] <= last + 1, (last, first)
    assert set(agent.worker_pids()).isdisjoint(workers)  # new processes: nobody held the state
    assert agent.wait(WAIT) == 0
    assert not snapshot_dir(cluster, "n0").exists()


class _Marker:
    """Unpickling this writes a file: proof that what came over the network ran."""

    path = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "executed"))


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports ``pid`` listens on (what an outside scan finds)."""
    try:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
                  if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
    except OSError:
        return set()
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _attack(port: int, marker: Path, job_id: str) -> None:
    _Marker.path = str(marker)
    evil = pickle.dumps({"model": _Marker(), "optimizer": {}, "step": 10**9})
    for node in ("n0", "n1"):
        for head in ({"node": node, "local_rank": 0, "round": 1, "step": 10**9, "size": len(evil)},  # the old format
                     {"v": 1, "job": job_id, "node": node, "local_rank": 0, "round": 1, "step": 10**9,
                      "size": len(evil)}):
            line = json.dumps(head).encode() + b"\n"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                    conn.sendall(line + b"\0" * 32 + evil + b"\0" * 32)  # tags made without the key
                    conn.shutdown(socket.SHUT_WR)
                    # Sent whole: the answer is only waited for a moment (torch's own ports never
                    # answer, and 5 s for each of them made this the suite's second slowest test).
                    conn.settimeout(1.0)
                    conn.recv(16)
            except OSError:
                pass


def test_a_pickle_sent_to_the_workers_ports_never_runs_when_they_resume(cluster, tmp_path):
    """The outside check of issue 21: a pickle with a huge step sent to every port the workers
    of a 2-node job listen on, then every worker killed: nothing executes on resume (the
    marker file never appears) and training goes on from the nodes' own snapshots."""
    job = [PYTHON, str(TRAIN), "--steps", "100000", "--checkpoint-every", "0", "--inprocess"]
    agents = [cluster.start_agent(n, min_nodes=2, max_nodes=2, nproc=1, command=job) for n in ("n0", "n1")]
    wait_until(lambda: any(step >= 20 for _, step, _ in cluster.steps()), WAIT, "step 20")
    marker = tmp_path / "marker"
    workers = [pid for agent in agents for pid in agent.worker_pids()]
    master = {int(os.environ.get("MASTER_PORT", "0"))}
    ports = {port for pid in workers for port in _listening_ports(pid)} - master
    assert ports, "the workers listen on no port"
    for port in ports:
        _attack(port, marker, cluster.job_id)
    killed_at = time.monotonic()
    last = max(step for _, step, _ in cluster.steps())
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # junk on torch's own ports (the process group's) may end a worker first
    try:
        first = wait_until(lambda: cluster.first_step_after(killed_at + 0.01), WAIT, "a step after the kill")
    except AssertionError:
        print(consoles(cluster.agents, 0, 20000))
        raise
    assert first[1] <= last + 1, (last, first)  # the attacker's step 10**9 was not taken
    assert first[1] >= 10  # resumed from a snapshot, not from the beginning
    wait_until(lambda: max(step for _, step, _ in cluster.steps()) >= first[1] + 10, WAIT, "training to go on")
    assert all(agent.proc.poll() is None for agent in agents)
    assert not marker.exists()
