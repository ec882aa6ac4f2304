"""A 3-member etcd cluster on 127.0.0.1 for tests: every member its own process, data dir
and ports; members are killed, paused and restarted by their own pid. Only tests use it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from rendezvous.etcd_server import etcd_binary
from rendezvous.net import free_port
from tests.waiting import wait_until


class Member:
    def __init__(self, name: str, data_dir: Path) -> None:
        self.name = name
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict | None:
        """etcd's /v3/maintenance/status for this member, or None when it does not answer."""
        request = urllib.request.Request(f"{self.client_url}/v3/maintenance/status", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=0.5) as reply:
                return json.loads(reply.read())
        except (OSError, ValueError):
            return None


class EtcdCluster:
    def __init__(self, size: int = 3, extra_args: tuple[str, ...] = ()) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="elastic-agent-etcd3-"))
        self.members = [Member(f"m{i}", self.root / f"m{i}") for i in range(size)]
        self.extra_args = extra_args
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> str:
        return ",".join(f"127.0.0.1:{m.client_port}" for m in self.members)

    def __enter__(self) -> EtcdCluster:
        try:
            for member in self.members:
                self._launch(member, "new")
            wait_until(self.leader, 30, "an etcd leader")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _launch(self, member: Member, state: str) -> None:
        member.data_dir.mkdir(parents=True, exist_ok=True)
        args = [str(etcd_binary()), "--name", member.name, "--data-dir", str(member.data_dir / "data"),
                "--listen-client-urls", member.client_url, "--advertise-client-urls", member.client_url,
                "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
                "--initial-cluster", self.initial, "--initial-cluster-state", state,
                "--initial-cluster-token", self.root.name, "--log-level", "warn", *self.extra_args]
        with open(member.data_dir / "etcd.log", "ab") as log:
            member.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def leader(self) -> Member | None:
        """The member that is leader now, as the members themselves say."""
        for member in self.members:
            if not member.running:
                continue
            status = member.status()
            if status and status.get("leader") and status["leader"] == status.get("header", {}).get("member_id"):
                return member
        return None

    def kill(self, member: Member) -> None:
        if member.running:
            assert member.proc is not None
            member.proc.send_signal(signal.SIGKILL)
            member.proc.wait(timeout=10)

    def restart(self, member: Member) -> None:
        """Start a killed member again with its data: it rejoins the cluster it left."""
        self.kill(member)
        self._launch(member, "existing")
        wait_until(lambda: member.status() is not None, 30, f"member {member.name} back")

    def pause(self, member: Member) -> None:
        assert member.proc is not None
        os.kill(member.proc.pid, signal.SIGSTOP)

    def resume(self, member: Member) -> None:
        assert member.proc is not None
        os.kill(member.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        for member in self.members:
            if member.proc is not None and member.proc.poll() is None:
                os.kill(member.proc.pid, signal.SIGCONT)
                member.proc.kill()
                member.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
