"""The files of a sharded job's in-memory snapshots (agent.worker.sharded_memory): one per rank
and step, in the node's snapshot directory in shared memory, its own ranks' and a peer node's.

A file is ``MAGIC``, one JSON header line and the body. The header names the job, the
(round, step), the rank and world size that wrote it, the body's size, a crc32 per MiB of it, and an
index: for each entry of the flattened state (``model.0.weight``, ``optimizer.state...``)
either a tensor piece (dtype, the global shape, the offsets and sizes of the piece this rank
held, where its raw bytes start in the body) or a JSON value (learning rates, flags). Raw
bytes and JSON: nothing in it is ever unpickled, and a rank reading a piece asks for exactly
the byte range it needs (a whole file is never sent to a rank that needs part of it).

A step whose unsharded entries were kept apart (a snapshot made in the optimizer's post-step
hook, before the script's scheduler stepped) has them in a small file of the same format per
node, ``rest-r<round>-s<step>``, written at the step's end.

A file is written to a temporary name and renamed. Every body block a read touches (here, or
to serve a peer) is checked against its crc32 first (once per file version), so checking
costs what reading costs; a failed check fails the whole recovery on every rank
(agent.worker.sharded_memory), so a corrupt file is never half used.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.tensor import DTensor

MAGIC = b"ELASTIC-AGENT-SHARD 1\n"
SUBDIR = ".sharded"  # a dot name: the replicated snapshots' listing (agent.worker.snapshot) skips it
MAX_INDEX = 64 << 20  # bytes a header line may take
BLOCK = 1 << 20  # bytes of body under one crc32
KEEP = 2  # files kept per rank: the newest and the one before (the newest may be incomplete elsewhere)
_NAME = re.compile(r"shard-r(\d{1,18})-s(\d{1,18})-k(\d{1,5})-of(\d{1,5})")
_REST = re.compile(r"rest-r(\d{1,18})-s(\d{1,18})")  # a step's unsharded entries, kept apart (one per node)
DTYPES = {str(t): t for t in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                              torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


log = logging.getLogger(__name__)


class ShardError(ValueError):
    """A rank file that is missing, corrupt or not what the state needs."""


# (round, step, rank, world): a rank file's identity
FileKey = tuple[int, int, int, int]


def split(state: Mapping[str, Any], buffers: dict[str, torch.Tensor] | None = None
          ) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]]]:
    """``state`` flattened in two (the snapshot's host copy, ``buffers`` reused where shape and
    dtype still fit: into memory touched before a copy is several times faster than into fresh
    pages, each first touch a page fault): what must be copied now (values, and the small unsharded
    tensors a forward pass may change, such as BatchNorm's running statistics), copied here;
    and this rank's shards of the DTensors (parameters, optimizer moments: only an optimizer
    step changes them), as (local view, global shape, offsets) to copy later."""
    flat, _ = flatten_state_dict(dict(state))
    now: dict[str, Any] = {}
    later: dict[str, tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]] = {}
    for name, value in flat.items():
        if isinstance(value, DTensor):
            chunks = value.__create_chunk_list__()
            if len(chunks) != 1:
                raise ShardError(f"{name}: a DTensor whose local part is {len(chunks)} pieces; el.run keeps one")
            piece = value.to_local().detach()
            if buffers is not None:
                _buffer(name, piece, buffers)  # allocated here: a thread's allocations bloat its own arena
            later[name] = (piece, tuple(value.shape), tuple(chunks[0].offsets))
        elif isinstance(value, torch.Tensor):
            now[name] = (host_copy(name, value, buffers), tuple(value.shape), (0,) * value.dim())
        else:
            now[name] = value
    if buffers is not None:
        for gone in buffers.keys() - now.keys() - later.keys():
            del buffers[gone]
    return now, later


def copy_shards(later: Mapping[str, tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]],
                buffers: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    return {name: (host_copy(name, piece, buffers), shape, offsets) for name, (piece, shape, offsets) in later.items()}


def host_copy(name: str, tensor: torch.Tensor, buffers: dict[str, torch.Tensor] | None) -> torch.Tensor:
    tensor = tensor.detach()
    if buffers is None:
        return tensor.to("cpu", copy=True)
    return _buffer(name, tensor, buffers).copy_(tensor)


def _buffer(name: str, tensor: torch.Tensor, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    kept = buffers.get(name)
    if kept is None or kept.shape != tensor.shape or kept.dtype != tensor.dtype:
        kept = buffers[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
    return kept


def file_name(key: FileKey) -> str:
    return "shard-r{}-s{}-k{}-of{}".format(*key)


def rest_name(at: tuple[int, int]) -> str:  # the file of (round, step) ``at``'s unsharded entries, kept apart
    return "rest-r{}-s{}".format(*at)


def rest_key(at: tuple[int, int]) -> FileKey:  # the key they are packed under: one file for every rank
    return (*at, 0, 1)


def classes(layouts: list[str]) -> list[int]:
    """Each rank's class: the ranks of one layout share one, numbered from 0 in rank order."""
    first: dict[str, int] = {}
    return [first.setdefault(one, len(first)) for one in layouts]


def every_class(held: set[tuple[int, int]]) -> bool:
    """Whether files of these (class, number of classes) are one of each class."""
    return len({n for _c, n in held}) == 1 and {c for c, _n in held} == set(range(next(iter(held))[1]))


def twins_of(head: Mapping[str, Any]) -> tuple[int, int]:
    """A file's (class, number of classes); a file without them is a class of its own."""
    return tuple(head["twins"]) if head.get("twins") else (head["rank"], head["world"])  # type: ignore[return-value]


def pack(job: str, key: FileKey, entries: dict[str, Any], twins: tuple[int, int] | None = None,
         rest: bool = False) -> tuple[bytes, list[memoryview]]:
    """One rank's file as its header and its body's parts (views of the tensors: no copy):
    ``entries`` maps each flattened key to a host tensor piece ``(tensor, global_shape,
    offsets)`` or a JSON value; ``twins`` its rank's (class, number of classes); ``rest``: its
    unsharded entries are not to be loaded from it (kept apart, taken later)."""
    index: dict[str, Any] = {}
    parts: list[memoryview] = []
    start = 0
    for name, value in entries.items():
        if isinstance(value, tuple) and len(value) == 3 and isinstance(value[0], torch.Tensor):
            tensor, shape, offsets = value
            flat = tensor.reshape(-1).contiguous()
            raw = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
            index[name] = {"t": "tensor", "dtype": str(tensor.dtype), "shape": list(shape),
                           "offsets": list(offsets), "sizes": list(tensor.shape), "start": start, "nbytes": raw.nbytes}
            parts.append(raw)
            start += raw.nbytes
        else:
            index[name] = {"t": "value", "value": value}
    head = {"job": job, "round": key[0], "step": key[1], "rank": key[2], "world": key[3], "size": start,
            "block": BLOCK, "crc32": block_crcs(parts), "entries": index, "twins": list(twins or key[2:]),
            "rest": rest}
    try:
        line = json.dumps(head, allow_nan=True).encode()
    except TypeError as exc:
        raise ShardError(f"the state holds a value that is neither a tensor nor JSON ({exc}); el.run keeps "
                         f"sharded state as tensors and plain numbers, strings, lists and dicts") from exc
    return MAGIC + line + b"\n", parts


def block_crcs(parts: list[memoryview]) -> list[int]:
    """The crc32 of each ``BLOCK`` bytes of the body the parts make: a reader checks only the
    blocks it reads, so a check costs what the read costs."""
    crcs: list[int] = []
    crc, filled = 0, 0
    for part in parts:
        view, at = part.cast("B"), 0
        while at < len(view):
            n = min(BLOCK - filled, len(view) - at)
            crc, filled, at = zlib.crc32(view[at:at + n], crc), filled + n, at + n
            if filled == BLOCK:
                crcs.append(crc)
                crc, filled = 0, 0
    if filled:
        crcs.append(crc)
    return crcs


def packed(job: str, key: FileKey, entries: dict[str, Any]) -> bytes:
    """The whole file as bytes (small files: a step's unsharded entries)."""
    head, parts = pack(job, key, entries)
    return head + b"".join(bytes(p) for p in parts)


def parse_head(data: bytes, job: str, key: FileKey) -> tuple[dict[str, Any], int]:
    """The checked header of a rank file whose first bytes are ``data``, and where its body starts."""
    end = data.find(b"\n", len(MAGIC))
    if not data.startswith(MAGIC) or end < 0:
        raise ShardError(f"{file_name(key)}: not a whole shard file")
    try:
        head = json.loads(data[len(MAGIC):end])
        ok = (isinstance(head, dict) and head.get("job") == job
              and [head.get(f) for f in ("round", "step", "rank", "world")] == list(key)
              and type(head.get("size")) is int and head.get("block") == BLOCK
              and isinstance(head.get("crc32"), list) and all(type(c) is int for c in head["crc32"])
              and len(head["crc32"]) == -(-head["size"] // BLOCK) and isinstance(head.get("entries"), dict)
              and (head.get("twins") is None or _twins_fit(head["twins"], key)))
    except (ValueError, RecursionError) as exc:
        raise ShardError(f"{file_name(key)}: its header is not JSON ({exc})") from exc
    if not ok:
        raise ShardError(f"{file_name(key)}: its header is not this job's file {list(key)}")
    for name, entry in head["entries"].items():
        _check_entry(key, name, entry, head["size"])
    return head, end + 1


def _twins_fit(twins: Any, key: FileKey) -> bool:
    return (isinstance(twins, list) and len(twins) == 2 and all(type(v) is int for v in twins)
            and 0 <= twins[0] < twins[1] <= key[3])


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
        # (name, size, mtime_ns) -> its header, where its body starts, the body blocks checked
        self._heads: dict[tuple[str, int, int], tuple[dict[str, Any], int, set[int]]] = {}
        self._lock = threading.Lock()

    def write(self, key: FileKey, *parts: Any) -> None:
        self._put(file_name(key), parts)
        self._prune(key[2])

    def write_rest(self, at: tuple[int, int], data: bytes) -> None:
        """The unsharded entries of (round, step) ``at``, as its end left them (``packed``)."""
        self._put(rest_name(at), [data])
        for old in sorted(self.rests())[:-KEEP]:
            (self.path / rest_name(old)).unlink(missing_ok=True)

    def rests(self) -> list[tuple[int, int]]:
        try:
            return [(int(m[1]), int(m[2])) for p in self.path.iterdir() if (m := _REST.fullmatch(p.name))]
        except OSError:
            return []

    def read_rest(self, at: tuple[int, int]) -> bytes | None:
        try:
            return (self.path / rest_name(at)).read_bytes()
        except OSError:
            return None

    def _put(self, name: str, parts: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                for part in parts:
                    f.write(part)
            os.replace(tmp, self.path / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

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
        for at in self.rests():
            if at < key:
                (self.path / rest_name(at)).unlink(missing_ok=True)

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

    def listing(self, round_number: int) -> list[list[int]]:
        """The files of rounds before ``round_number``: key, size, twins and whether its unsharded
        entries are kept apart (an unreadable one left out)."""
        files = []
        for k in self.held():
            if k[0] >= round_number:
                continue
            try:
                with open(self.path / file_name(k), "rb") as f:
                    st = os.fstat(f.fileno())
                    head = self._known(f, k, st)[0]
                    files.append([*k, st.st_size, *twins_of(head), int(head.get("rest") is True)])
            except (OSError, ShardError) as exc:
                log.warning("rank file %s left out of the recovery: %s", file_name(k), exc)
        return files

    def _known(self, f: Any, key: FileKey, st: os.stat_result) -> tuple[dict[str, Any], int, set[int]]:
        """The file's checked header, where its body starts, its body blocks checked: cached per version."""
        version = (file_name(key), st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._heads.get(version)
        if known is None:
            data, more, limit = bytearray(f.read(min(st.st_size, BLOCK))), b".", min(st.st_size, MAX_INDEX)
            while more and data.find(b"\n", len(MAGIC)) < 0 and len(data) < limit:  # a header past the first MiB
                more = f.read(min(BLOCK, limit - len(data)))
                data += more
            known = (*parse_head(bytes(data), self.job, key), set())
            with self._lock:
                self._heads = {v: h for v, h in self._heads.items() if v[0] != version[0]}
                self._heads[version] = known
        return known

    def keep_pushed(self, head: dict[str, Any], payload: bytes) -> None:
        """A rank file pushed to this node's port: kept once its header is this job's file's."""
        if head.get("kind") != "shard":
            raise OSError("this port keeps sharded rank files only")
        key = (head["round"], head["step"], head["rank"], head["world"])
        try:
            end = payload.find(b"\n", len(MAGIC), MAX_INDEX)  # no copy of the body
            parse_head(bytes(payload[:end + 1]) if end >= 0 else b"", self.job, key)
        except ShardError as exc:
            raise OSError(str(exc)) from exc
        self.write(key, payload)

    def serve(self, ask: dict[str, Any]) -> bytes:
        """A byte range of a rank file this node holds, for a fetch."""
        key = (ask["round"], ask["step"], ask["rank"], ask["world"])
        if key not in self.held():
            raise OSError(f"{file_name(key)} is not held here")
        return self.read(key, ask["offset"], ask["length"])

    def read(self, key: FileKey, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of a file, every body block they touch checked against
        its crc32 (once per file version); ShardError/OSError otherwise."""
        path = self.path / file_name(key)
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            head, body, checked = self._known(f, key, st)
            if offset + length > st.st_size or body + head["size"] != st.st_size:
                raise ShardError(f"{path}: {length} bytes at {offset} lie beyond its end, or it is cut short")
            first, last = max(0, offset - body) // BLOCK, max(0, offset + length - body - 1) // BLOCK
            if offset + length <= body:  # the header alone: checked as it was parsed
                f.seek(offset)
                return f.read(length)
            f.seek(body + first * BLOCK)
            blocks = bytearray(min(st.st_size - body - first * BLOCK, (last - first + 1) * BLOCK))
            if f.readinto(blocks) != len(blocks):
                raise ShardError(f"{path}: cut short while read")
            for i in range(first, last + 1):
                if i not in checked:
                    chunk = memoryview(blocks)[(i - first) * BLOCK:(i - first + 1) * BLOCK]
                    if zlib.crc32(chunk) != head["crc32"][i]:
                        raise ShardError(f"{path}: block {i} does not match its checksum (corrupt)")
                    checked.add(i)
            if offset >= body:
                start = offset - body - first * BLOCK
                return memoryview(blocks)[start:start + length]  # type: ignore[return-value] - no copy
            f.seek(offset)
            return f.read(body - offset) + blocks[:offset + length - body]


def room(path: Path) -> int:
    """Bytes free where the rank files go: the most a pushed one may be."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize

