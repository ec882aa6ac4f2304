"""The snapshot transport between nodes: local rank 0 of each node sends its snapshots to a
peer node's :class:`PeerServer`. Only the job's members can store anything there.

The port is reachable by anyone on the network, and what it stores is later loaded and sent
to every rank, so (docs/security.md):

- Authenticated: every message carries two HMAC-SHA256 tags under the job's snapshot key (a
  random 32-byte secret the agents keep in etcd, handed to the workers in a 0600 file, never on
  a command line or in the environment): one over the header line, checked before a byte of
  the payload is read, one over header and payload, checked before anything is stored.
- Bounded: the header line is at most ``MAX_HEADER`` bytes; its size is checked against the
  receiver's limit (``max_bytes``: what the snapshot directory can hold) before the payload is
  read; at most ``MAX_CONNECTIONS`` connections are served at a time (the rest are closed at
  once); a connection has ``HEADER_TIMEOUT`` seconds for its header and a deadline for the
  whole transfer, not just per read.
- Checked: every header field has its type and range checked (``check_header``).
- Never unpickled: the payload is stored as bytes; loading it is ``torch.load(...,
  weights_only=True)`` (agent.worker.snapshot), which builds tensors and plain containers only.

Message: one JSON header line, 32 bytes HMAC(header line), ``size`` payload bytes, 32 bytes
HMAC(header line + payload). The receiver answers ``ok`` only once the snapshot is stored.
A sharded job's rank file (agent.worker.sharded_memory) is pushed the same way, its header
naming it (``kind: "shard"``, the rank and world size of the round it belongs to).

A fetch (``kind: "fetch"``, sharded recovery) asks for ``length`` bytes at ``offset`` of one
rank file the receiver's node holds: the header alone, signed as above (no payload); the
answer is the bytes and HMAC(header line + bytes), which the asker checks before using them.
A fetch is bounded (``MAX_FETCH``) and names a file by its fields, never by a path.
No torch here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WIRE_VERSION = 1
KEY_FILE = ".key"  # in the node's snapshot directory, written by the agent (mode 0600)
KEY_BYTES = 32
MAX_HEADER = 4096
MAX_CONNECTIONS = 2
SLICE = 0.1  # seconds a push's send or read blocks before it checks its deadline and cancel
CONNECT_SLICE = 0.5  # seconds one connect of a push may take before it is tried again
HEADER_TIMEOUT = 5.0
PUSH_TIMEOUT = 10.0  # seconds to send one snapshot to the peer, plus MIN_RATE below
MIN_RATE = 50 * 2**20  # bytes per second a transfer must at least reach
MAX_INT = 2**62
_TAG = 32
_CHUNK = 1 << 20
_NODE = re.compile(r"[A-Za-z0-9._-]{1,253}")
MAX_FETCH = 16 << 20  # bytes one fetch may ask for (an asker splits a longer range)
MAX_WORLD = 1 << 16


class WireError(ValueError):
    """A message that is not a whole, authentic snapshot of this job."""


def write_key(directory: Path, key: bytes) -> Path:
    """The job's snapshot key in ``directory`` (created 0700), readable by this user only."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / KEY_FILE
    tmp = directory / f".key.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_key(directory: Path) -> bytes | None:
    """The key the agent left for this node's workers; None (no transport) when there is none,
    or when others than this user could read it."""
    path = directory / KEY_FILE
    try:
        st = path.stat()
        if st.st_mode & 0o077 or st.st_uid != os.getuid():
            log.warning("snapshot key %s is readable by others (mode %o) or not ours; snapshots are not "
                        "sent to a peer", path, st.st_mode & 0o777)
            return None
        key = path.read_bytes()
    except OSError:
        return None
    return key if len(key) >= 16 else None


def _tag(key: bytes, *parts: bytes) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.digest()


def _int(head: dict[str, Any], name: str, low: int, high: int) -> int:
    value = head.get(name)
    if type(value) is not int or not low <= value <= high:  # bool is not a step
        raise WireError(f"header field {name!r} is {value!r}, expected an integer in [{low}, {high}]")
    return value


def check_header(head: Any, job: str, max_bytes: int) -> dict[str, Any]:
    """The header's fields, each of the type and range expected; WireError otherwise."""
    if not isinstance(head, dict):
        raise WireError("the header is not a JSON object")
    if head.get("v") != WIRE_VERSION or head.get("job") != job:
        raise WireError(f"header of version {head.get('v')!r}, job {head.get('job')!r}: not this job's")
    node = head.get("node")
    if not isinstance(node, str) or not _NODE.fullmatch(node):
        raise WireError(f"header field 'node' is {node!r}, expected a node id")
    return {"node": node, "local_rank": _int(head, "local_rank", 0, 65535),
            "round": _int(head, "round", 0, MAX_INT), "step": _int(head, "step", 0, MAX_INT),
            "size": _int(head, "size", 0, max_bytes), **_shard_fields(head)}


def _shard_fields(head: dict[str, Any]) -> dict[str, Any]:
    """A sharded job's rank file (``kind: "shard"``): which rank of which world size."""
    kind = head.get("kind", "state")
    if kind == "state":
        return {}
    if kind != "shard":
        raise WireError(f"header field 'kind' is {kind!r}, expected 'state' or 'shard'")
    world = _int(head, "world", 1, MAX_WORLD)
    return {"kind": "shard", "world": world, "rank": _int(head, "rank", 0, world - 1)}


def check_fetch(head: Any, job: str) -> dict[str, Any]:
    """A fetch request's fields (which rank file, which byte range); WireError otherwise."""
    if not isinstance(head, dict) or head.get("v") != WIRE_VERSION or head.get("job") != job:
        raise WireError("a fetch that is not this job's")
    world = _int(head, "world", 1, MAX_WORLD)
    return {"round": _int(head, "round", 0, MAX_INT), "step": _int(head, "step", 0, MAX_INT), "world": world,
            "rank": _int(head, "rank", 0, world - 1), "offset": _int(head, "offset", 0, MAX_INT),
            "length": _int(head, "length", 1, MAX_FETCH)}


class _Reader:
    """Reads a connection to a deadline for the whole message, never more than asked."""

    def __init__(self, conn: socket.socket, deadline: float) -> None:
        self.conn, self.deadline = conn, deadline

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise WireError("the sender is too slow")
        return left

    def exactly(self, n: int, buf: bytearray | None = None) -> bytes:
        """``n`` bytes, into ``buf`` when it is given (of that size: memory touched before takes a
        copy several times faster than fresh pages)."""
        if buf is None or len(buf) != n:
            buf = bytearray(n)  # the size was checked against the receiver's limit: one buffer, no copies
        view, got = memoryview(buf), 0
        while got < n:
            self.conn.settimeout(self._left())
            k = self.conn.recv_into(view[got:], min(_CHUNK, n - got))
            if not k:
                raise WireError("connection closed before the whole message arrived")
            got += k
        return buf  # type: ignore[return-value] - a bytearray: bytes-like, and not copied again

    def line(self, limit: int) -> bytes:
        buf = bytearray()
        while not buf.endswith(b"\n"):
            if len(buf) >= limit:
                raise WireError(f"header longer than {limit} bytes")
            self.conn.settimeout(self._left())
            chunk = self.conn.recv(1)
            if not chunk:
                raise WireError("connection closed before the header ended")
            buf += chunk
        return bytes(buf)


def _transfer_time(size: int) -> float:
    return PUSH_TIMEOUT + size / MIN_RATE


# (header, payload) -> stores them; raises OSError when they cannot be kept
Store = Callable[[dict[str, Any], bytes], None]
# checked fetch fields -> the bytes asked for; raises OSError/ValueError when they cannot be had
Serve = Callable[[dict[str, Any]], bytes]


class PeerServer:
    """Receives the peer's snapshots; ``store`` keeps each authentic one. ``max_bytes`` is
    asked at each connection (the directory's room may change)."""

    def __init__(self, store: Store, host: str, *, job: str, key: bytes, max_bytes: Callable[[], int],
                 serve: Serve | None = None) -> None:
        self.store, self.job, self.key, self.max_bytes, self.serve = store, job, key, max_bytes, serve
        self.stored = 0  # snapshots stored, for tests
        self.ended = 0  # connections over (served, turned away or refused), for tests
        self._lock = threading.Lock()
        self._spare: bytearray | None = None  # the last snapshot's buffer: the next is most often as big
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._sock = socket.create_server((host, 0))
        self.address = f"{host}:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True, name="snapshot-server").start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                conn.close()  # enough being served: a flood costs nothing here
                self._ended()
                continue
            threading.Thread(target=self._receive, args=(conn,), daemon=True, name="snapshot-receive").start()

    def _ended(self) -> None:
        with self._lock:
            self.ended += 1

    def _receive(self, conn: socket.socket) -> None:
        try:
            with conn:
                if self.receive(conn):
                    conn.sendall(b"ok\n")
        except (OSError, WireError) as exc:
            log.debug("a peer snapshot was not received: %s", exc)  # a stray or hostile sender: ignored
        except Exception:  # noqa: BLE001 - nothing a sender does may end this thread with a traceback
            log.warning("a peer snapshot was not received", exc_info=True)
        finally:
            self._slots.release()
            self._ended()

    def receive(self, conn: socket.socket) -> bool:
        """Serve one message; True when a pushed snapshot was stored (a fetch is answered here)."""
        reader = _Reader(conn, time.monotonic() + HEADER_TIMEOUT)
        line = reader.line(MAX_HEADER)
        if not hmac.compare_digest(reader.exactly(_TAG), _tag(self.key, line)):
            raise WireError("header not signed with this job's snapshot key")
        try:
            raw = json.loads(line)
            if isinstance(raw, dict) and raw.get("kind") == "fetch":
                ask = check_fetch(raw, self.job)
            else:
                head = check_header(raw, self.job, self.max_bytes())
        except (ValueError, RecursionError) as exc:
            raise WireError(f"bad header: {exc}") from exc
        if isinstance(raw, dict) and raw.get("kind") == "fetch":
            if self.serve is None:
                raise WireError("this port serves no fetches")
            try:
                data = self.serve(ask)
            except (OSError, ValueError) as exc:  # not held, or corrupt here: the asker tries elsewhere
                raise WireError(f"cannot serve the fetch: {exc}") from exc
            if len(data) != ask["length"]:
                raise WireError(f"cannot serve {ask['length']} bytes at {ask['offset']}")
            conn.settimeout(_transfer_time(len(data)))
            conn.sendall(data)
            conn.sendall(_tag(self.key, line, data))
            return False
        reader.deadline = time.monotonic() + _transfer_time(head["size"])
        with self._lock:
            spare, self._spare = self._spare, None
        payload = reader.exactly(head["size"], spare)
        try:
            if not hmac.compare_digest(reader.exactly(_TAG), _tag(self.key, line, payload)):
                raise WireError("payload not signed with this job's snapshot key")
            self.store(head, payload)
        finally:
            with self._lock:
                self._spare = payload  # type: ignore[assignment] - the bytearray exactly() filled
        self.stored += 1
        return True

    def close(self) -> None:
        self._sock.close()


def push(address: str, header: dict[str, Any], payload: bytes | list[memoryview], *, job: str, key: bytes,
         cancel: threading.Event | None = None) -> None:
    """Send one snapshot (its bytes, or its parts in order: never joined into one copy) to a
    peer's :class:`PeerServer`; raises OSError when it did not land. Every wait (to connect, to
    send, for the answer) is sliced (``SLICE``), so ``cancel`` ends the push within a slice: a
    peer that vanished without a reset (a machine gone) holds nobody to the deadline."""
    host, _, port = address.rpartition(":")
    parts = [memoryview(payload)] if isinstance(payload, bytes) else payload
    size = sum(p.nbytes for p in parts)
    line = json.dumps({**header, "v": WIRE_VERSION, "job": job, "size": size}).encode() + b"\n"
    mac = hmac.new(key, line, hashlib.sha256)
    wait = _Wait(address, time.monotonic() + _transfer_time(size), cancel)
    with wait.connect(host, int(port)) as conn:
        wait.send(conn, memoryview(line + _tag(key, line)))
        for part in parts:
            view = part.cast("B")
            wait.send(conn, view)
            mac.update(view)
        wait.send(conn, memoryview(mac.digest()))
        answer = b""
        while b"\n" not in answer and len(answer) < 8:
            more = wait.call(conn.recv, 8 - len(answer))
            if not more:
                break
            answer += more
        if answer != b"ok\n":
            raise OSError(f"peer {address} did not confirm the snapshot")


class _Wait:
    """A push's waits, each at most ``SLICE`` long, between which its deadline and its cancel are checked."""

    def __init__(self, address: str, deadline: float, cancel: threading.Event | None) -> None:
        self.address, self.deadline, self.cancel = address, deadline, cancel

    def _check(self) -> float:
        if self.cancel is not None and self.cancel.is_set():
            raise OSError(f"push to {self.address} cancelled")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise OSError(f"push to {self.address} timed out")
        return left

    def connect(self, host: str, port: int) -> socket.socket:
        while True:
            left = self._check()
            try:
                conn = socket.create_connection((host, port), timeout=min(left, CONNECT_SLICE))
            except (socket.timeout, TimeoutError):
                continue  # a SYN unanswered (a host gone): try again until cancelled or late
            conn.settimeout(SLICE)
            return conn

    def call(self, op: Callable[..., Any], *args: Any) -> Any:
        while True:
            self._check()
            try:
                return op(*args)
            except (socket.timeout, TimeoutError):
                continue

    def send(self, conn: socket.socket, view: memoryview) -> None:
        at = 0
        while at < len(view):
            at += self.call(conn.send, view[at:at + _CHUNK])


def fetch(address: str, ask: dict[str, Any], *, job: str, key: bytes) -> bytes:
    """``ask["length"]`` bytes at ``ask["offset"]`` of the rank file (round, step, rank, world)
    that the node at ``address`` holds, checked against the job's key; OSError when they could
    not be had whole and authentic."""
    host, _, port = address.rpartition(":")
    line = json.dumps({**ask, "v": WIRE_VERSION, "job": job, "kind": "fetch"}).encode() + b"\n"
    length = int(ask["length"])
    with socket.create_connection((host, int(port)), timeout=_transfer_time(length)) as conn:
        conn.sendall(line + _tag(key, line))
        reader = _Reader(conn, time.monotonic() + _transfer_time(length))
        try:
            data = reader.exactly(length)
            if not hmac.compare_digest(reader.exactly(_TAG), _tag(key, line, data)):
                raise WireError("answer not signed with this job's snapshot key")
        except WireError as exc:
            raise OSError(f"fetch from {address}: {exc}") from exc
    return data
