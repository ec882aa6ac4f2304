"""The files of a sharded job's in-memory snapshots (agent.worker.sharded_memory): one per rank
and step, in the node's snapshot directory in shared memory, its own ranks' and a peer node's.

A file is ``MAGIC``, one JSON header line and the body. The header names the job, the
(round, step), the rank and world size that wrote it, the body's size and crc32, and an
index: for each entry of the flattened state (``model.0.weight``, ``optimizer.state...``)
either a tensor piece (dtype, the global shape, the offsets and sizes of the piece this rank
held, where its raw bytes start in the body) or a JSON value (learning rates, flags). Raw
bytes and JSON: nothing in it is ever unpickled, and a rank reading a piece asks for exactly
the byte range it needs (a whole file is never sent to a rank that needs part of it).

A file is written to a temporary name and renamed; before any byte of it is used (here or
served to a peer) its body is checked against its crc32 once (cached by size and mtime), so a
corrupted file is refused as a whole, never half used.
"""

from __future__ import annotations

import json
import os
import re
import threading
import zlib
from pathlib import Path
from typing import Any

import torch

MAGIC = b"ELASTIC-AGENT-SHARD 1\n"
SUBDIR = ".sharded"  # a dot name: the replicated snapshots' listing (agent.worker.snapshot) skips it
MAX_INDEX = 64 << 20  # bytes a header line may take
KEEP = 2  # files kept per rank: the newest and the one before (the newest may be incomplete elsewhere)
_NAME = re.compile(r"shard-r(\d{1,18})-s(\d{1,18})-k(\d{1,5})-of(\d{1,5})")
DTYPES = {str(t): t for t in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                              torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


class ShardError(ValueError):
    """A rank file that is missing, corrupt or not what the state needs."""


# (round, step, rank, world): a rank file's identity
FileKey = tuple[int, int, int, int]


def file_name(key: FileKey) -> str:
    return "shard-r{}-s{}-k{}-of{}".format(*key)


def pack(job: str, key: FileKey, entries: dict[str, Any]) -> bytes:
    """One rank's file: ``entries`` maps each flattened key to a host tensor piece
    ``(tensor, global_shape, offsets)`` or a JSON value."""
    index: dict[str, Any] = {}
    parts: list[bytes] = []
    start = 0
    for name, value in entries.items():
        if isinstance(value, tuple) and len(value) == 3 and isinstance(value[0], torch.Tensor):
            tensor, shape, offsets = value
            raw = tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            index[name] = {"t": "tensor", "dtype": str(tensor.dtype), "shape": list(shape),
                           "offsets": list(offsets), "sizes": list(tensor.shape), "start": start, "nbytes": len(raw)}
            parts.append(raw)
            start += len(raw)
        else:
            index[name] = {"t": "value", "value": value}
    body = b"".join(parts)
    head = {"job": job, "round": key[0], "step": key[1], "rank": key[2], "world": key[3], "size": len(body),
            "crc32": zlib.crc32(body), "entries": index}
    try:
        line = json.dumps(head, allow_nan=True).encode()
    except TypeError as exc:
        raise ShardError(f"the state holds a value that is neither a tensor nor JSON ({exc}); el.run keeps "
                         f"sharded state as tensors and plain numbers, strings, lists and dicts") from exc
    return MAGIC + line + b"\n" + body


def parse_head(data: bytes, job: str, key: FileKey) -> tuple[dict[str, Any], int]:
    """The checked header of a rank file whose first bytes are ``data``, and where its body starts."""
    end = data.find(b"\n", len(MAGIC))
    if not data.startswith(MAGIC) or end < 0:
        raise ShardError(f"{file_name(key)}: not a whole shard file")
    try:
        head = json.loads(data[len(MAGIC):end])
        ok = (isinstance(head, dict) and head.get("job") == job
              and [head.get(f) for f in ("round", "step", "rank", "world")] == list(key)
              and type(head.get("size")) is int and type(head.get("crc32")) is int
              and isinstance(head.get("entries"), dict))
    except (ValueError, RecursionError) as exc:
        raise ShardError(f"{file_name(key)}: its header is not JSON ({exc})") from exc
    if not ok:
        raise ShardError(f"{file_name(key)}: its header is not this job's file {list(key)}")
    for name, entry in head["entries"].items():
        _check_entry(key, name, entry, head["size"])
    return head, end + 1


def _check_entry(key: FileKey, name: str, entry: Any, size: int) -> None:
    if not isinstance(entry, dict) or entry.get("t") not in ("tensor", "value"):
        raise ShardError(f"{file_name(key)}: entry {name!r} is neither a tensor nor a value")
    if entry["t"] == "value":
        return
    ints = [entry.get("start"), entry.get("nbytes"), *(entry.get("shape") or []), *(entry.get("offsets") or []),
            *(entry.get("sizes") or [])]
    dims = {len(entry.get(f) or []) if isinstance(entry.get(f), list) else -1 for f in ("shape", "offsets", "sizes")}
    if (entry.get("dtype") not in DTYPES or len(dims) != 1 or -1 in dims
            or not all(type(i) is int and i >= 0 for i in ints)):
        raise ShardError(f"{file_name(key)}: entry {name!r} is malformed")
    count = 1
    for o, n, g in zip(entry["offsets"], entry["sizes"], entry["shape"]):
        if o + n > g:
            raise ShardError(f"{file_name(key)}: entry {name!r} lies outside its tensor")
        count *= n
    if count * DTYPES[entry["dtype"]].itemsize != entry["nbytes"] or entry["start"] + entry["nbytes"] > size:
        raise ShardError(f"{file_name(key)}: entry {name!r} does not fit the body")


class ShardDir:
    """This node's rank files of one job (its own ranks' and its peer's)."""

    def __init__(self, snapshot_dir: Path, job: str) -> None:
        self.path = snapshot_dir / SUBDIR
        self.job = job
        self._verified: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) whose crc matched
        self._lock = threading.Lock()

    def write(self, key: FileKey, data: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path / f".{file_name(key)}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path / file_name(key))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._prune(key[2])

    def _prune(self, rank: int) -> None:
        """Keep the ``KEEP`` newest files of rank index ``rank``."""
        mine = sorted((k for k in self.held() if k[2] == rank), reverse=True)
        for old in mine[KEEP:]:
            (self.path / file_name(old)).unlink(missing_ok=True)

    def drop_older(self, key: tuple[int, int]) -> None:
        """Forget every file older by (round, step) than ``key`` (after a recovery from it)."""
        for old in self.held():
            if old[:2] < key:
                (self.path / file_name(old)).unlink(missing_ok=True)

    def held(self) -> list[FileKey]:
        try:
            names = [p.name for p in self.path.iterdir()]
        except OSError:
            return []
        found = []
        for name in names:
            m = _NAME.fullmatch(name)
            if m:
                key = tuple(int(g) for g in m.groups())
                if key[2] < key[3]:
                    found.append(key)
        return found  # type: ignore[return-value]

    def size(self, key: FileKey) -> int:
        return (self.path / file_name(key)).stat().st_size

    def read(self, key: FileKey, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of a verified file; ShardError/OSError otherwise."""
        path = self.path / file_name(key)
        with open(path, "rb") as f:
            self._verify(key, f)
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise ShardError(f"{path}: {length} bytes at {offset} lie beyond its end")
        return data

    def _verify(self, key: FileKey, f: Any) -> None:
        st = os.fstat(f.fileno())
        name = file_name(key)
        with self._lock:
            if self._verified.get(name) == (st.st_size, st.st_mtime_ns):
                return
        head, body = parse_head(f.read(min(st.st_size, MAX_INDEX)), self.job, key)
        f.seek(body)
        crc, left = 0, head["size"]
        while left > 0:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            crc, left = zlib.crc32(chunk, crc), left - len(chunk)
        if left or f.read(1) or crc != head["crc32"]:
            raise ShardError(f"{self.path / name}: its body does not match its checksum (corrupt or cut short)")
        with self._lock:
            self._verified[name] = (st.st_size, st.st_mtime_ns)
