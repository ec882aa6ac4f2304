"""Shared fixtures: a real etcd on 127.0.0.1, a fresh job id per test, and bounded waits.

Every wait in the suite goes through :func:`wait_until`, which has a deadline; nothing sleeps
in place of synchronisation. Servers and participants started here are stopped by their own
handles (the etcd process by its pid), never by name.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator

import pytest

from agent.daemon.workers import procfs
from rendezvous.etcd.server import EtcdServer
from tests.waiting import DEFAULT_WAIT_S, wait_until  # noqa: F401 - re-exported for the suites


def torchrun_env(env: dict[str, str], tmp: os.PathLike[str] | str) -> dict[str, str]:
    """``env`` for a torchrun process, with TMPDIR in the test's own temporary directory:
    torchrun makes a ``torchelastic_*`` directory there on every run and never removes it."""
    return {**env, "TMPDIR": str(tmp)}


def stop_server(server: EtcdServer) -> None:
    """Stop an etcd we started, by its pid, and remove its data dir."""
    proc = server.proc
    try:
        server.stop()
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdServer]:
    """One etcd for the whole run (tests isolate themselves by job id). Tests that kill or
    pause etcd must use :func:`etcd_factory` instead."""
    server = EtcdServer().start()
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def etcd_factory() -> Iterator[Callable[[], EtcdServer]]:
    """Private etcd servers for tests that kill, pause or restart them."""
    made: list[EtcdServer] = []

    def make() -> EtcdServer:
        server = EtcdServer()
        made.append(server)
        return server.start()

    yield make
    for server in made:
        if server.proc is not None and server.proc.poll() is None and _stopped(server):
            server.resume()
        stop_server(server)


def _stopped(server: EtcdServer) -> bool:
    """True when the server process is SIGSTOPped (a test paused it)."""
    assert server.proc is not None
    return procfs.state(server.proc.pid) == "T"


@pytest.fixture
def job_id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"
