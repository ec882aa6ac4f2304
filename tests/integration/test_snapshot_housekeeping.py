"""What the agent does with the in-memory snapshots on its host (agent.daemon.workers.local): the
workers get the job's snapshot key in a file only their user can read, and the snapshots of
node ids no longer in the job are removed when a round starts. Real files, workers faked."""

from __future__ import annotations

import stat

from agent.daemon.workers.local import Layout, LocalWorkers
from agent.worker.snapshot_wire import KEY_FILE, read_key
from rendezvous.clock import SystemClock
from rendezvous.state import Assignment, Member


class NoGroup:
    def __init__(self, command, envs, log_dir, routes, warm) -> None:
        self.envs, self.pids = envs, [1]

    def start(self) -> None:
        pass


def workers(tmp_path, monkeypatch, key: bytes | None = None) -> LocalWorkers:
    monkeypatch.setattr("agent.daemon.workers.local.snapshots_of", lambda job, log_dir: tmp_path / "shm" / job)
    layout = Layout(command=("true",), nproc=1, node_id="host-a-123456", job_id="j", log_dir=tmp_path / "logs",
                    checkpoint_dir=None, max_restarts=0, shutdown_timeout=1, snapshot_key=lambda: key)
    return LocalWorkers(layout, {}, SystemClock(), factory=NoGroup)


def assignment(round_number: int, *members: str, standbys: tuple[str, ...] = ()) -> Assignment:
    return Assignment(round_number, tuple(Member(m, "127.0.0.1", 1) for m in members), "127.0.0.1", 1,
                      standbys=standbys)


def test_snapshots_of_node_ids_gone_from_the_job_are_removed_when_a_round_starts(tmp_path, monkeypatch):
    local = workers(tmp_path, monkeypatch)
    job = tmp_path / "shm" / "j"
    for node in ("host-a-old111", "host-b-222222", "standby-1"):  # an earlier id of this host, peers
        (job / node).mkdir(parents=True)
        (job / node / "own-0").write_bytes(b"x" * 1000)
    local.start(assignment(3, "host-a-123456", "host-b-222222", standbys=("standby-1",)))
    assert sorted(p.name for p in job.iterdir()) == ["host-b-222222", "standby-1"]  # host-a-old111 went


def test_the_workers_get_the_jobs_snapshot_key_readable_by_their_user_only(tmp_path, monkeypatch):
    local = workers(tmp_path, monkeypatch, key=b"s" * 64)
    run = local.start(assignment(1, "host-a-123456"))
    directory = local.layout.snapshot_dir
    assert stat.S_IMODE((directory / KEY_FILE).stat().st_mode) == 0o600
    assert read_key(directory) == b"s" * 64
    env = run.group.envs[0]
    assert all(b"s" * 64 != value.encode() for value in env.values())  # never in the environment
