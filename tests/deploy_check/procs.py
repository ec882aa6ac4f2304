"""Processes, waits and HTTP for the deploy check: every process it starts is its own session,
recorded by pid and stopped by process group at the end; every wait has a deadline."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class CheckFailed(Exception):
    """A scenario did not behave as the deploy files promise."""


def log(msg: str) -> None:
    """One line, stamped with UTC time: the report reads transitions from these stamps."""
    print(time.strftime("%H:%M:%S", time.gmtime()) + f" {msg}", flush=True)


def sbin(name: str) -> str:
    """The path of a daemon or tool (Debian puts daemons in /usr/sbin, off a user's PATH)."""
    found = shutil.which(name) or str(Path("/usr/sbin") / name)
    if not Path(found).exists():
        raise CheckFailed(f"{name} not found")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], T | None], timeout: float, every: float = 0.5) -> T:
    """``check()``'s first truthy value, polled until ``timeout`` seconds; CheckFailed after."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def http_json(url: str, params: dict[str, str] | None = None, timeout: float = 5.0) -> Any:
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (127.0.0.1 only)
        return json.loads(resp.read())


class Procs:
    """The processes this check started, each in its own session (pgid == pid)."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], logfile: Path, *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(logfile, "ab")  # noqa: SIM115 (the child holds it)
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        out.close()
        self.started.append((name, proc))
        return proc

    def kill_group(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        """SIGTERM to every group, 10 s, then SIGKILL: newest first (agents before etcd)."""
        for _, proc in reversed(self.started):
            self.kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in reversed(self.started):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self.kill_group(proc, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log(f"warning: pid {proc.pid} did not end after SIGKILL")
        self.started.clear()
