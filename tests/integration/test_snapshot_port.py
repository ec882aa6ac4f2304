"""The snapshot port (agent.worker.snapshot_wire) under hostile senders: random and crafted
headers and payloads, a wrong key, a huge size, a truncated message, another job, a pickle
that would write a marker file. Never a crash, never stored, never loaded. Real sockets."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import pickle
import socket
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.worker import snapshot_wire as wire
from agent.worker.snapshot import SnapshotDir, Snapshots
from tests.waiting import wait_until

KEY = b"0123456789abcdef" * 4
DEADLINE_S = 30.0


class Marker:
    """Unpickling this writes a file: the proof that received bytes were executed."""

    path = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "executed"))


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    directory = tmp_path_factory.mktemp("snaps")
    snaps = Snapshots(SnapshotDir(directory, "j"), 1, "b", 0, key=KEY)
    snaps.serve("127.0.0.1")
    yield snaps, directory
    snaps.server.close()


def send(address: str, data: bytes) -> bytes:
    host, _, p = address.rpartition(":")
    with socket.create_connection((host, int(p)), timeout=DEADLINE_S) as conn:
        try:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            return conn.recv(16)
        except OSError:
            return b""


def message(head: dict, payload: bytes, key: bytes = KEY, header_key: bytes | None = None) -> bytes:
    line = json.dumps(head).encode() + b"\n"
    return (line + hmac.new(header_key or key, line, hashlib.sha256).digest() + payload
            + hmac.new(key, line + payload, hashlib.sha256).digest())


def valid_head(size: int, **over) -> dict:
    return {"v": 1, "job": "j", "node": "a", "local_rank": 0, "round": 1, "step": 5, "size": size, **over}


def marker_pickle(path: Path) -> bytes:
    Marker.path = str(path)
    return pickle.dumps({"model": Marker(), "optimizer": {}, "step": 10**9})


def stored(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != wire.KEY_FILE)


def hostile(marker: Path) -> list[bytes]:
    evil = marker_pickle(marker)
    return [
        message(valid_head(len(evil)), evil, key=b"x" * 64),  # not the job's key
        message(valid_head(len(evil), job="other"), evil),  # another job's header (signed with ours)
        message(valid_head(2**60), evil),  # a huge size: refused before reading
        message(valid_head(len(evil)), evil)[:-40],  # truncated
        message(valid_head(len(evil)), evil, header_key=b"y" * 64),  # header forged, payload tag right
        message(valid_head(len(evil), step=True), evil),  # a bool for a step
        message(valid_head(len(evil), node="../../etc"), evil),
        message(valid_head(len(evil), round=-1), evil),
        b"{" * 10_000,  # no end of header
        b"",
    ]


def test_hostile_messages_are_never_stored_nor_loaded(port, tmp_path, monkeypatch):
    crashed: list[object] = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    snaps, directory = port
    marker = tmp_path / "marker"
    before = snaps.server.stored
    for data in hostile(marker):
        assert send(snaps.address, data) != b"ok\n"
    assert snaps.server.stored == before and stored(directory) == [] and crashed == []
    assert snaps.offer(max_round=9) is None and snaps.take() is None
    assert not marker.exists()


def test_an_authentic_pickle_is_stored_but_never_executed_when_loaded(port, tmp_path):
    """Even one signed with the key (a member gone rogue) runs nothing: loading is weights_only."""
    snaps, directory = port
    marker = tmp_path / "marker"
    evil = marker_pickle(marker)
    assert send(snaps.address, message(valid_head(len(evil)), evil)) == b"ok\n"
    assert snaps.offer(max_round=9) == (1, 5)
    assert snaps.take() is None
    assert not marker.exists()
    for path in directory.iterdir():
        if path.name != wire.KEY_FILE:
            path.unlink()


def test_an_authentic_snapshot_gets_through(port):
    snaps, directory = port
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}, "optimizer": {}, "step": 5}, buf)
    wire.push(snaps.address, {"node": "a", "local_rank": 0, "round": 1, "step": 5}, buf.getvalue(), job="j", key=KEY)
    assert snaps.offer(max_round=9) == (1, 5)
    assert snaps.take()["model"]["w"].tolist() == [1.0, 1.0]
    (directory / "peer-a-0").unlink()


def test_connections_over_the_limit_are_closed_and_the_port_still_serves(port):
    snaps, directory = port
    host, _, p = snaps.address.rpartition(":")
    idle = [socket.create_connection((host, int(p)), timeout=DEADLINE_S) for _ in range(20)]
    try:
        # The extra ones are closed at once: the server holds at most MAX_CONNECTIONS.
        def closed() -> int:
            count = 0
            for conn in idle:
                conn.setblocking(False)
                try:
                    count += conn.recv(1) == b""
                except BlockingIOError:
                    pass
            return count
        wait_until(lambda: closed() >= 20 - wire.MAX_CONNECTIONS, DEADLINE_S, "the extra connections to close")
    finally:
        for conn in idle:
            conn.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=st.one_of(st.dictionaries(st.sampled_from(["v", "job", "node", "local_rank", "round", "step", "size"]),
                                      st.one_of(st.integers(-2**70, 2**70), st.text(max_size=20), st.none(),
                                                st.booleans(), st.floats(allow_nan=True))),
                      st.binary(max_size=200).map(lambda b: {"raw": b.hex()})),
       payload=st.binary(max_size=2000), signed=st.booleans(), cut=st.integers(0, 3000))
def test_random_messages_never_crash_nor_store(port, tmp_path, head, payload, signed, cut):
    snaps, directory = port
    before = snaps.server.stored
    data = message(head, payload, key=KEY if signed else b"z" * 64)
    reply = send(snaps.address, data[:cut] if cut < len(data) else data)
    fully_valid = signed and cut >= len(data) and reply == b"ok\n"
    if not fully_valid:
        assert snaps.server.stored == before and stored(directory) == []
    for path in directory.iterdir():
        if path.name != wire.KEY_FILE:
            path.unlink()
    assert snaps.take() is None
