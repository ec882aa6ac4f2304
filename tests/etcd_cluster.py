"""A 3-member etcd cluster on 127.0.0.1 for tests: every member its own process, data dir
and ports; members are killed, paused and restarted by their own pid. Only tests use it.

Members may also live in network namespaces (tests/chaos/netns.py): each is then given its
address and the command prefix that runs it there (``ip netns exec NS``, which execs in
place, so the pid we hold is etcd's own); it listens on etcd's usual ports at that address."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from rendezvous.etcd.server import PORT_TRIES, etcd_binary, lost_a_port
from rendezvous.net import free_port
from tests.waiting import wait_until


class Member:
    def __init__(self, name: str, data_dir: Path, host: str = "127.0.0.1", wrap: tuple[str, ...] = ()) -> None:
        self.name = name
        self.data_dir = data_dir
        self.host = host
        self.wrap = wrap  # the prefix that runs a command where this member lives
        self.client_port = 2379 if wrap else free_port()
        self.peer_port = 2380 if wrap else free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict | None:
        """etcd's /v3/maintenance/status for this member, or None when it does not answer."""
        if self.wrap:  # out of our namespace's reach: ask from where the member lives
            return _status_from(self.wrap, f"{self.client_url}/v3/maintenance/status")
        request = urllib.request.Request(f"{self.client_url}/v3/maintenance/status", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=0.5) as reply:
                return json.loads(reply.read())
        except (OSError, ValueError):
            return None


def _status_from(wrap: tuple[str, ...], url: str) -> dict | None:
    code = ("import sys, urllib.request\n"
            "r = urllib.request.Request(sys.argv[1], data=b'{}', method='POST')\n"
            "print(urllib.request.urlopen(r, timeout=0.5).read().decode())")
    try:
        proc = subprocess.run([*wrap, sys.executable, "-S", "-c", code, url], capture_output=True, text=True,
                              timeout=5)
        return json.loads(proc.stdout) if proc.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


class EtcdCluster:
    def __init__(self, size: int = 3, extra_args: tuple[str, ...] = (),
                 hosts: list[tuple[str, tuple[str, ...]]] | None = None) -> None:
        """``hosts``: (address, command prefix) of each member, when they live in network
        namespaces; default: ``size`` members on 127.0.0.1."""
        self.root = Path(tempfile.mkdtemp(prefix="elastic-agent-etcd3-"))
        if hosts is None:
            self.members = [Member(f"m{i}", self.root / f"m{i}") for i in range(size)]
        else:
            self.members = [Member(f"m{i}", self.root / f"m{i}", host, wrap) for i, (host, wrap) in enumerate(hosts)]
        self.extra_args = extra_args

    @property
    def initial(self) -> str:
        """etcd's --initial-cluster: every member's name and peer URL."""
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> str:
        return ",".join(f"{m.host}:{m.client_port}" for m in self.members)

    def __enter__(self) -> EtcdCluster:
        try:
            for attempt in range(1, PORT_TRIES + 1):
                for member in self.members:
                    self._launch(member, "new")
                try:
                    wait_until(lambda: self._exited() or self.leader(), 30, "an etcd leader")
                except AssertionError as e:
                    raise AssertionError(f"{e}\n{self._logs()}") from None
                exited = self._exited()
                if not exited:
                    return self
                if not any(lost_a_port(m.data_dir / "etcd.log") for m in exited):
                    raise AssertionError(f"an etcd member exited while the cluster started\n{self._logs()}")
                if attempt == PORT_TRIES:
                    raise AssertionError(f"etcd members could not bind their ports in {PORT_TRIES} tries")
                self._anew()
        except BaseException:
            self.close()
            raise
        return self

    def _exited(self) -> list[Member]:
        """Members (ours, not in a namespace) that exited while the cluster started: one whose
        free port was taken before it bound it (by an outgoing connection's ephemeral port, say)
        makes the whole cluster start again on new ports."""
        return [m for m in self.members if not m.wrap and m.proc is not None and not m.running]

    def _logs(self) -> str:
        """Each member's state and the end of its log: what a failed start leaves to read."""
        lines = []
        for m in self.members:
            try:
                tail = (m.data_dir / "etcd.log").read_bytes()[-600:].decode(errors="replace")
            except OSError:
                tail = "(no log)"
            lines.append(f"{m.name} {m.peer_url} running={m.running}: {tail.strip()}")
        return "\n".join(lines)

    def _anew(self) -> None:
        """Everything new: ports, root dir and cluster token, so nothing of the failed start
        (a data dir, a peer that remembers old addresses) takes part in the next."""
        self.close()
        self.root = Path(tempfile.mkdtemp(prefix="elastic-agent-etcd3-"))
        for member in self.members:
            member.proc = None
            member.data_dir = self.root / member.name
            member.client_port, member.peer_port = free_port(), free_port()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _launch(self, member: Member, state: str) -> None:
        member.data_dir.mkdir(parents=True, exist_ok=True)
        args = [*member.wrap, str(etcd_binary()), "--name", member.name, "--data-dir", str(member.data_dir / "data"),
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
