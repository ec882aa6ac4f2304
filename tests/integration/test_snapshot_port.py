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
import time
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


def test_snapshots_of_one_size_reuse_the_receive_buffer_and_a_forged_one_spoils_nothing(port):
    """The port keeps the last snapshot's buffer for the next of that size: a forged message
    received into it is refused and leaves the stored file as it was; the next authentic one
    is stored byte for byte."""
    snaps, directory = port
    first, forged, second = (bytes([b]) * 4096 for b in (1, 2, 3))
    head = {"node": "a", "local_rank": 0, "round": 1}
    wire.push(snaps.address, {**head, "step": 5}, first, job="j", key=KEY)
    held = (directory / "peer-a-0").read_bytes()
    assert held.endswith(first)
    bad = message(valid_head(len(forged), step=6), forged)[:-32] + b"\0" * 32  # payload tag wrong
    assert send(snaps.address, bad) != b"ok\n"
    assert (directory / "peer-a-0").read_bytes() == held
    wire.push(snaps.address, {**head, "step": 7}, second, job="j", key=KEY)
    assert (directory / "peer-a-0").read_bytes().endswith(second) and snaps.offer(max_round=9) == (1, 7)
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


# --- a sharded job's port (agent.worker.sharded_memory): fetches of byte ranges, rank-file pushes ---

@pytest.fixture(scope="module")
def shard_port(tmp_path_factory):
    from agent.worker.shard_store import packed
    from agent.worker.sharded_memory import ShardedMemory

    directory = tmp_path_factory.mktemp("shards")
    wire.write_key(directory, KEY)
    memory = ShardedMemory(directory, "j", 1, None, node="b", local_rank=0, local_world=1, round_number=1)
    memory.serve("127.0.0.1")
    data = packed("j", (1, 5, 0, 2), {"w": (torch.arange(6.0), (12,), (0,)), "lr": 0.1})
    memory.files.write((1, 5, 0, 2), data)
    yield memory, data
    memory.server.close()


def fetch_head(**over) -> dict:
    return {"v": 1, "job": "j", "kind": "fetch", "round": 1, "step": 5, "rank": 0, "world": 2, "offset": 0,
            "length": 8, **over}


def ask(address: str, head: dict, key: bytes = KEY) -> bytes:
    line = json.dumps(head).encode() + b"\n"
    return send_all(address, line + hmac.new(key, line, hashlib.sha256).digest())


def send_all(address: str, data: bytes) -> bytes:
    host, _, p = address.rpartition(":")
    with socket.create_connection((host, int(p)), timeout=DEADLINE_S) as conn:
        try:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := conn.recv(1 << 16):
                out += chunk
            return out
        except OSError:
            return b""


def test_an_authentic_fetch_gets_exactly_the_bytes_asked_for(shard_port):
    memory, data = shard_port
    got = wire.fetch(memory.address, {k: v for k, v in fetch_head(offset=3, length=40).items()
                                      if k not in ("v", "job", "kind")}, job="j", key=KEY)
    assert got == data[3:43]


def test_hostile_fetches_get_nothing(shard_port):
    memory, data = shard_port
    for head, key in [
        (fetch_head(), b"x" * 64),  # not the job's key
        (fetch_head(job="other"), KEY),
        (fetch_head(offset=-1), KEY),
        (fetch_head(length=wire.MAX_FETCH + 1), KEY),  # over the bound: never read
        (fetch_head(offset=len(data) - 4, length=8), KEY),  # beyond the end
        (fetch_head(step=6), KEY),  # a file not held here
        (fetch_head(rank=2), KEY),  # a rank outside the world
        (fetch_head(length=True), KEY),
        (fetch_head(kind="fetch", world=0), KEY),
    ]:
        assert ask(memory.address, head, key) == b"", head
    # Files are named by their fields, never by a path: a "name" is ignored, the file asked for is sent.
    assert ask(memory.address, fetch_head(name="../../.key"))[:8] == data[:8]


def test_a_pushed_rank_file_that_is_not_one_is_not_stored(shard_port):
    memory, _ = shard_port
    before = sorted(memory.files.held())
    head = {"node": "a", "local_rank": 0, "round": 1, "step": 7, "kind": "shard", "rank": 1, "world": 2}
    with pytest.raises(OSError):
        wire.push(memory.address, head, b"not a shard file", job="j", key=KEY)
    with pytest.raises(OSError):  # a rank outside its world
        wire.push(memory.address, {**head, "rank": 2}, b"x", job="j", key=KEY)
    assert sorted(memory.files.held()) == before


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=st.dictionaries(st.sampled_from(["v", "job", "kind", "round", "step", "rank", "world", "offset", "length",
                                            "size", "node", "local_rank"]),
                            st.one_of(st.integers(-2**70, 2**70), st.text(max_size=12), st.none(), st.booleans(),
                                      st.sampled_from(["fetch", "shard", "j", 1]))),
       signed=st.booleans())
def test_random_fetches_and_shard_pushes_never_crash_nor_leak(shard_port, head, signed):
    memory, data = shard_port
    before = sorted(memory.files.held())
    reply = ask(memory.address, head, KEY if signed else b"z" * 64)
    if reply:  # only an authentic, well-formed fetch of a held range is answered, with exactly that range
        ok = fetch_head(**{k: head[k] for k in ("offset", "length") if k in head})
        assert signed and all(head.get(k) == ok[k] for k in ("v", "job", "kind", "round", "step", "rank", "world"))
        assert reply[:-32] == data[head["offset"]:head["offset"] + head["length"]]
    assert sorted(memory.files.held()) == before


def test_a_push_to_a_peer_that_stopped_reading_ends_when_cancelled_not_at_its_deadline():
    """A node gone without a reset (a machine preempted): its port accepted the push, then
    nothing. The sender is cancelled (its group re-forms) and must be free within a slice,
    not at the deadline of a 64 MiB transfer (wire.PUSH_TIMEOUT and more)."""
    silent = socket.create_server(("127.0.0.1", 0))
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    accepted: list[socket.socket] = []
    cancel, outcome = threading.Event(), {}

    def pusher() -> None:
        began = time.monotonic()
        try:
            wire.push(f"127.0.0.1:{silent.getsockname()[1]}", {"kind": "shard"}, bytes(64 << 20), job="j", key=KEY,
                      cancel=cancel)
        except OSError as exc:
            outcome["error"] = str(exc)
        outcome["took"] = time.monotonic() - began

    thread = threading.Thread(target=pusher, daemon=True)
    try:
        thread.start()
        silent.settimeout(DEADLINE_S)
        accepted.append(silent.accept()[0])  # connected; it will never read a byte
        cancelled = time.monotonic()
        cancel.set()
        thread.join(DEADLINE_S)
        assert not thread.is_alive()
        assert "cancelled" in outcome.get("error", ""), outcome
        assert time.monotonic() - cancelled < 2.0 < wire.PUSH_TIMEOUT, outcome
    finally:
        for conn in accepted:
            conn.close()
        silent.close()
