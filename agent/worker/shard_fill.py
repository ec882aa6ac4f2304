"""A rank's new pieces, filled from the rank files of one (round, step) (agent.worker.sharded_memory):
the byte ranges of the files that overlap them, read from this node's copy, else fetched point
to point, in bounded chunks, from a node that holds one (agent.worker.snapshot_wire). No rank
ever holds more than its own new pieces and one chunk. Every block read is checked (crc32
here, HMAC on the wire); a file that fails fails the whole fill, never part of it. Also which
pieces a rank holds (its layout: ranks of one layout are twins).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.tensor import DTensor

from agent.worker import shard_store as store
from agent.worker import snapshot_wire as wire
from agent.worker.shard_store import FileKey, ShardError

HEAD_READ = 1 << 20  # bytes first asked for a rank file's header


def fill(memory: Any, template: dict[str, Any], choice: tuple[int, int, int, int],
          holders: Mapping[FileKey, Any], twins: Mapping[FileKey, tuple[int, int]], rest: bytes | None
          ) -> dict[str, Any]:
    """``template`` (this rank's new pieces) filled from the rank files of ``choice``: one file
    of each class of twins, this node's where it holds one; its unsharded entries from
    ``rest`` where they were kept apart."""
    rnd, step, world, _rank = choice
    local = set(memory.files.held())
    one: dict[int, FileKey] = {}
    for key in sorted((k for k in twins if k[:2] == (rnd, step) and k[3] == world), key=lambda k: k not in local):
        one.setdefault(twins[key][0], key)
    keys = [one[c] for c in sorted(one)]
    read = Reader(memory, holders, local)
    heads = [read.head(k) for k in keys]
    flat, mappings = flatten_state_dict(template)
    if set(flat) != set(heads[0][0]["entries"]):
        raise ShardError(f"the snapshot of step {step} holds other entries than the state "
                         f"(e.g. {sorted(set(flat) ^ set(heads[0][0]['entries']))[:3]})")
    order = sorted(range(len(keys)), key=lambda r: keys[r] not in local)  # local pieces first
    values = Blob(rest, memory.job, store.rest_key((rnd, step)), store.rest_name((rnd, step))) if rest is not None else {}
    for name, value in flat.items():
        if isinstance(value, DTensor):
            chunk = value.__create_chunk_list__()[0]
            fill_piece(name, value.to_local(), list(chunk.offsets),
                       [(keys[r], heads[r][0]["entries"][name], heads[r][1]) for r in order], read)
        elif isinstance(value, torch.Tensor):
            r = order[0]
            source = values.get(name) or (keys[r], heads[r][0]["entries"][name], heads[r][1])
            fill_piece(name, value, [0] * value.dim(), [source], values.read if name in values else read)
        else:
            entry = values[name][1] if name in values else heads[0][0]["entries"][name]
            if entry["t"] != "value":
                raise ShardError(f"{name}: a tensor in the snapshot, a value in the state")
            flat[name] = tuple(entry["value"]) if isinstance(value, tuple) else entry["value"]
    return unflatten_state_dict(flat, mappings)


def layout(state: Mapping[str, Any], rank: int) -> str:
    """Which piece of each sharded tensor this rank holds. Ranks of one layout (the replicas of
    an HSDP mesh) hold the same bytes, so one's file stands for the others' (its "twins"). A
    partial DTensor (its pieces not yet summed) makes a rank a class of its own."""
    flat, _ = flatten_state_dict(dict(state))
    pieces: list[Any] = []
    for name, value in sorted(flat.items()):
        if isinstance(value, DTensor):
            if any(p.is_partial() for p in value.placements):
                return f"rank {rank}"
            pieces.append([name, [list(c.offsets) + list(c.sizes) for c in value.__create_chunk_list__()]])
    return hashlib.sha256(json.dumps(pieces).encode()).hexdigest()


class Reader:
    """Byte ranges of the chosen rank files: from this node's files, else from a holder's port."""

    def __init__(self, memory: Any, holders: Mapping[FileKey, Any], local: set[FileKey]) -> None:
        self.memory, self.holders, self.local = memory, holders, local

    def __call__(self, key: FileKey, offset: int, length: int) -> bytes:
        parts = [self._part(key, at, min(wire.MAX_FETCH, offset + length - at))
                 for at in range(offset, offset + length, wire.MAX_FETCH)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _part(self, key: FileKey, offset: int, length: int) -> bytes:
        failures = []
        if key in self.local:
            try:
                return self.memory.files.read(key, offset, length)
            except (OSError, ShardError) as exc:  # corrupt or gone here: another node's copy may do
                failures.append(f"this node: {exc}")
        for address, _size in self.holders.get(key, []):
            if address is None or address == self.memory.address or self.memory.key is None:
                continue
            ask = {"round": key[0], "step": key[1], "rank": key[2], "world": key[3], "offset": offset,
                   "length": length}
            try:
                return wire.fetch(address, ask, job=self.memory.job, key=self.memory.key)
            except OSError as exc:
                failures.append(f"{address}: {exc}")
        raise ShardError(f"{store.file_name(key)} could not be fetched from any node ({'; '.join(failures)})")

    def head(self, key: FileKey) -> tuple[dict[str, Any], int]:
        size = min(s for _a, s in self.holders[key])
        data = bytes(self(key, 0, min(size, HEAD_READ)))
        while b"\n" not in data[len(store.MAGIC):] and len(data) < min(size, store.MAX_INDEX):
            data += bytes(self(key, len(data), min(size, store.MAX_INDEX) - len(data)))
        return store.parse_head(data, self.memory.job, key)


class Blob(dict):
    """A small file held whole (``packed``), checked: its entries as fill_piece takes them."""

    def __init__(self, data: bytes, job: str, key: FileKey, label: str) -> None:
        try:
            head, body = store.parse_head(data, job, key)
            if len(data) != body + head["size"] or store.block_crcs([memoryview(data)[body:]]) != head["crc32"]:
                raise ShardError("cut short or corrupt")
        except ShardError as exc:  # named as the user finds it, not by the key it was packed under
            raise ShardError(f"{label}: {str(exc).removeprefix(store.file_name(key) + ': ')}") from exc
        super().__init__({name: (key, entry, body) for name, entry in head["entries"].items()})
        self.data = data

    def read(self, _key: FileKey, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]


def fill_piece(name: str, target: torch.Tensor, offsets: list[int], pieces: list[tuple[FileKey, Any, int]],
                read: Callable[[FileKey, int, int], bytes]) -> None:
    """Copy into ``target`` (at ``offsets`` of its tensor) the parts of ``pieces`` that overlap it."""
    sizes, seen, covered = list(target.shape), set(), 0
    for key, entry, body in pieces:
        if entry.get("t") != "tensor" or len(entry["offsets"]) != len(offsets):
            raise ShardError(f"{name}: {store.file_name(key)} holds it in another shape")
        so, ss = entry["offsets"], entry["sizes"]
        if (tuple(so), tuple(ss)) in seen:
            continue  # a replica of a piece already taken (HSDP)
        lo = [max(a, b) for a, b in zip(offsets, so)]
        hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, sizes, so, ss)]
        if any(h <= low for low, h in zip(lo, hi)):
            continue
        seen.add((tuple(so), tuple(ss)))
        dtype = store.DTYPES[entry["dtype"]]
        if dtype != target.dtype:
            raise ShardError(f"{name}: {entry['dtype']} in {store.file_name(key)}, {target.dtype} in the state")
        start = body + entry["start"]
        if not sizes:
            target.copy_(_tensor(read(key, start, entry["nbytes"]), dtype, []))
            covered += 1
            continue
        row = entry["nbytes"] // max(1, ss[0])
        rows = max(1, wire.MAX_FETCH // max(1, row))
        for a in range(lo[0] - so[0], hi[0] - so[0], rows):
            b = min(hi[0] - so[0], a + rows)
            src = _tensor(read(key, start + a * row, (b - a) * row), dtype, [b - a, *ss[1:]])
            dst = target.narrow(0, so[0] + a - offsets[0], b - a)
            for d in range(1, len(sizes)):
                src = src.narrow(d, lo[d] - so[d], hi[d] - lo[d])
                dst = dst.narrow(d, lo[d] - offsets[d], hi[d] - lo[d])
            dst.copy_(src)
        n = 1
        for low, h in zip(lo, hi):
            n *= h - low
        covered += n
    if covered != target.numel():
        raise ShardError(f"{name}: the snapshot covers {covered} of the {target.numel()} elements this rank needs")


def _tensor(data: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    buf = bytearray(data) if isinstance(data, bytes) else data  # a writable buffer: no copy, no warning
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)
