"""In-memory snapshots and recovery in process for sharded models (FSDP2/DTensor) under ``el.run``.

Each rank holds only its shards, so the replicated design (agent.worker.snapshot: local rank
0's state; the most advanced rank broadcasts its whole state) does not apply. Instead (see
docs/architecture.md, "Sharded state in memory"):

- After every ``every``-th step each rank copies the small unsharded entries (a forward pass
  may change them) to host memory: the step's only stall. A background thread copies its own
  shards (only an optimizer step changes them), writes all as one rank file
  (agent.worker.shard_store: raw bytes and a JSON index, never a pickle) into its node's
  snapshot directory in shared memory, and pushes a copy to the rank of the same local rank
  on the next node (agent.worker.snapshot_wire, authenticated), unless that rank is a twin
  (an HSDP replica: the same pieces, so its own file stands for ours). The next optimizer step waits
  for that, so a snapshot is never of a later state than the step it was taken after, and at
  most one is in flight. (A script that changes the weights other than by an optimizer step,
  between steps, must do it after the optimizer step, as it would with DCP's async save.)
- When a group forms, every rank says which rank files its node holds (JSON). Rank 0 picks
  the newest (round, step) with a file of every class of twins held by some live node, unless the
  newest disk checkpoint is newer. Every rank rebuilds the model on the new mesh
  (``build_model``; the optimizer keeps its object, its parameters re-pointed) and fills its
  new shards from the byte ranges of the old rank files that overlap them: read locally, or
  fetched point to point, in bounded chunks, from a node that holds them. No rank ever holds
  the whole model. If any rank cannot fill its shards (a file missing, corrupt, unreachable),
  every rank loads the same disk checkpoint instead, never a mix.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from agent.worker import shard_store as store
from agent.worker import sharded
from agent.worker import snapshot_wire as wire
from agent.worker.held import _all_gather_bytes, _any_rank, _broadcast_bytes, _newest_on_disk
from agent.worker.manifest import CheckpointError
from agent.worker.protocol import NODE_ID_ENV, SNAPSHOT_DIR_ENV
from agent.worker.shard_store import FileKey, ShardError

log = logging.getLogger(__name__)

HEAD_READ = 1 << 20  # bytes first asked for a rank file's header
TWIN_EVERY = 10  # the default cadence where an HSDP replica on another node holds the same pieces live


def state_of(held: Any) -> dict[str, Any]:
    """The sharded state (DTensors keyed by parameter name; the optimizer's state initialised)."""
    model, optim = get_state_dict(held.model, held.optimizer)
    state = {"model": model, "optimizer": optim, "step": held.completed}
    if held.extra is not None:
        state["extra"] = held.extra()
    return state


def load_state(held: Any, state: Mapping[str, Any]) -> None:
    set_state_dict(held.model, held.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if held.load_extra is not None and "extra" in state:
        held.load_extra(state["extra"])


class ShardedMemory:
    """This rank's sharded snapshots, its snapshot port, and the recovery of a new group."""

    def __init__(self, directory: Path, job: str, every: int | None,
                 build_model: Callable[[], torch.nn.Module] | None,
                 *, node: str, local_rank: int, local_world: int, round_number: int) -> None:
        self.files = store.ShardDir(directory, job)
        self.job, self.build_model = job, build_model
        self.asked = every  # None: the default, chosen at each agreement (_pick_peer)
        self.every = 1 if every is None else every
        self.node, self.local_rank, self.local_world = node, local_rank, local_world
        self.key = wire.read_key(directory)
        self.built_round = round_number  # the round whose mesh the model is sharded on
        self.server: wire.PeerServer | None = None
        self.address: str | None = None
        self.peer: str | None = None
        self.taken = -1  # the step of this rank's newest file (or of the state a recovery gave it)
        self.mesh: tuple[int, int, int] | None = None  # (round, rank, world) the model is sharded on now
        self.twins: tuple[int, int] | None = None  # this rank's (class, classes) in the current round
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()  # the push in flight's: set when its peer may be gone
        self._buffers: dict[str, torch.Tensor] = {}  # host copies, reused: the one in flight is done first

    # --- taking snapshots ------------------------------------------------------------------
    def after_step(self, step: int, round_number: int, state: Mapping[str, Any]) -> bool:
        if self.every <= 0 or (step + 1) % self.every != 0:
            return False
        self.before_update()
        # The shards are copied by the thread, behind the next forward and backward passes:
        # only an optimizer step changes them, and the next one waits for the thread first.
        now, later = store.split(state, self._buffers)
        key = (round_number, step, dist.get_rank(), dist.get_world_size())
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._keep, args=(key, now, later, self.peer, self._cancel),
                                        daemon=True, name="shard-snapshot-writer")
        self._thread.start()
        self.taken = step
        return True

    def before_update(self) -> None:
        """Before an optimizer step (and the next snapshot): the one in flight is kept."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait_idle(self, timeout: float) -> bool:
        """Wait for the snapshot in flight (before a planned exit: the others need its shards)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def cancel_push(self) -> None:
        """The group is gone (its peer may be too, without a reset): the push in flight ends
        now, not at its deadline; this node's own copy is still written."""
        self._cancel.set()

    def _keep(self, key: FileKey, now: dict[str, Any], later: Mapping[str, Any], peer: str | None,
              cancel: threading.Event) -> None:
        try:
            head, parts = store.pack(self.job, key, {**now, **store.copy_shards(later, self._buffers)}, self.twins)
            # The peer's copy first: it is what a loss of this node needs, and until it lands a
            # kill here costs the job this step; this node's own copy is waited for anyway
            # (before_update) before any recovery reads it.
            try:
                if peer is not None and self.key is not None:
                    wire_head = {"node": self.node, "local_rank": self.local_rank, "round": key[0],
                                 "step": key[1], "kind": "shard", "rank": key[2], "world": key[3]}
                    wire.push(peer, wire_head, [memoryview(head), *parts], job=self.job, key=self.key,
                              cancel=cancel)
            finally:
                self.files.write(key, head, *parts)
        except ShardError as exc:
            log.error("sharded snapshot of step %d failed: %s", key[1], exc)
        except Exception as exc:  # noqa: BLE001 - a failed snapshot never breaks training
            log.warning("sharded snapshot of step %d not kept whole: %s", key[1], exc)

    # --- the port --------------------------------------------------------------------------
    def serve(self, host: str) -> None:
        if self.server is None and self.key is not None:
            self.server = wire.PeerServer(self._store, host, job=self.job, key=self.key, serve=self._serve,
                                          max_bytes=lambda: _room(self.files.path.parent))
            self.address = self.server.address

    def _store(self, head: dict[str, Any], payload: bytes) -> None:
        if head.get("kind") != "shard":
            raise OSError("this port keeps sharded rank files only")
        key = (head["round"], head["step"], head["rank"], head["world"])
        try:
            end = payload.find(b"\n", len(store.MAGIC), store.MAX_INDEX)  # no copy of the body
            store.parse_head(bytes(payload[:end + 1]) if end >= 0 else b"", self.job, key)
        except ShardError as exc:
            raise OSError(str(exc)) from exc
        self.files.write(key, payload)

    def _serve(self, ask: dict[str, Any]) -> bytes:
        key = (ask["round"], ask["step"], ask["rank"], ask["world"])
        if key not in self.files.held():
            raise OSError(f"{store.file_name(key)} is not held here")
        return self.files.read(key, ask["offset"], ask["length"])

    # --- recovery --------------------------------------------------------------------------
    def agree(self, held: Any, elastic: Any, round_number: int, endpoints: list[tuple[str, int]]) -> int:
        """Collective: every rank of the new group ends up with the same state (see the module
        docstring); returns its step (-1: none, start from the beginning)."""
        self.cancel_push()  # the survivors' files are their own; a push may wait on a node gone
        self.before_update()
        self._keep_live(held)
        took = {"start": time.perf_counter()}
        if self.built_round != round_number and self.build_model is not None:
            sharded.rebuild(held, self.build_model)
        self.built_round = round_number
        took["rebuild"] = time.perf_counter()
        held.endpoints = set(endpoints)
        mine = {"completed": held.completed, "address": self.address, "endpoints": sorted(held.endpoints),
                "files": self.files.listing(round_number),
                "layout": store.layout(held.model.state_dict(), dist.get_rank())}
        everyone = [_message(raw) for raw in _all_gather_bytes(json.dumps(mine).encode())]
        held.endpoints = {e for rank in everyone for e in rank["endpoints"]}
        self._pick_peer([e["address"] for e in everyone],
                        store.classes([e["layout"] or f"rank {i}" for i, e in enumerate(everyone)]))
        holders: dict[FileKey, list[tuple[str | None, int]]] = {}
        twins: dict[FileKey, tuple[int, int]] = {}
        for e in everyone:
            for *k, size, twin, classes in e["files"]:
                holders.setdefault(tuple(k), []).append((e["address"], size))  # type: ignore[arg-type]
                twins.setdefault(tuple(k), (twin, classes))  # type: ignore[arg-type]
        choice = _decide(elastic, twins)
        took["agree"] = time.perf_counter()
        state, failure = None, None
        if choice is not None:
            try:
                state = _fill(self, state_of(held), choice, holders, twins)
            except (ShardError, OSError, KeyError) as exc:
                failure = str(exc)
            took["fill"] = time.perf_counter()
            if _any_rank(failure is not None):
                failure = failure or "another rank's could not be loaded"
                log.warning("the in-memory shards of step %d cannot be loaded (%s); every rank resumes from disk",
                            choice[1], failure)
                state = None
        if state is not None:
            load_state(held, state)
            took["load"] = time.perf_counter()
            held.completed = int(state["step"])
            self.files.drop_older(choice[:2])  # type: ignore[index]
            _say_resumed(choice, took)  # type: ignore[arg-type]
        else:
            start, loaded = elastic.load(default=lambda: state_of(held))
            if start == 0 and any(e["completed"] >= 0 for e in everyone):
                raise CheckpointError(
                    "the job's sharded state is lost: " + (f"the in-memory shards failed ({failure})" if failure else
                                                           "a node's shards are in no live node's memory")
                    + " and there is no checkpoint on disk to resume from")
            if start > 0:
                load_state(held, loaded)
            held.completed = start - 1
        held.round = round_number
        self.mesh, self.taken = (round_number, dist.get_rank(), dist.get_world_size()), held.completed
        return held.completed

    def _keep_live(self, held: Any) -> None:
        """This survivor's state as it is, when it is newer than its last file (a cadence of
        more than one step), kept before the model is rebuilt: an HSDP replica then stands for
        its lost twin at the very step the job reached, and no rank rolls back to the last
        cadence step for want of its own pieces. Only an optimizer step changes the shards,
        and ``held.completed`` counts the ones that ran, so the file is that step's."""
        if self.every <= 0 or self.mesh is None or held.completed <= self.taken:
            return
        rnd, rank, world = self.mesh
        now, later = store.split(state_of(held), self._buffers)
        self._keep((rnd, held.completed, rank, world), now, later, None, threading.Event())
        self.taken = held.completed

    def _pick_peer(self, addresses: list[str | None], classes: list[int]) -> None:
        """The rank on the next node gets a copy of this rank's files, unless it is a twin (an
        HSDP replica of the same shards): its own file then stands for ours, nothing is sent."""
        world, rank = len(addresses), dist.get_rank()
        self.twins = (classes[rank], max(classes) + 1)
        other = (rank + self.local_world) % world
        self.peer = addresses[other] if world > self.local_world and classes[other] != classes[rank] else None
        twin_elsewhere = world > self.local_world and classes[other] == classes[rank]
        if twin_elsewhere:
            log.info("snapshots stay on this node: rank %d on the next node holds the same shards", other)
        if self.asked is None:  # a live twin elsewhere covers a node lost at any step (_keep_live)
            self.every = TWIN_EVERY if twin_elsewhere else 1


def _room(path: Path) -> int:
    """Bytes free where the rank files go: the most a pushed one may be."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _decide(elastic: Any, twins: Mapping[FileKey, tuple[int, int]]) -> tuple[int, int, int] | None:
    """(round, step, world) of the snapshot every rank loads, None for disk (rank 0's rule):
    the newest whose files, one of each class of twins, are all held somewhere."""
    decision = None
    if dist.get_rank() == 0:
        found: dict[tuple[int, int, int], set[tuple[int, int]]] = {}
        for k, twin in twins.items():
            found.setdefault(k[:2] + (k[3],), set()).add(twin)
        best = max((s for s, held in found.items() if store.every_class(held)), default=None)
        try:
            disk = _newest_on_disk(elastic)
        except Exception as exc:  # noqa: BLE001 - the others wait on this choice
            log.warning("cannot list the checkpoints on disk (%s)", exc)
            disk = None
        if best is not None and disk is not None and disk >= best[:2]:
            best = None
        decision = json.dumps(best).encode()
    raw = json.loads(_broadcast_bytes(decision, 0) or b"null")
    return tuple(int(v) for v in raw) if isinstance(raw, list) and len(raw) == 3 else None  # type: ignore[return-value]


def _fill(memory: ShardedMemory, template: dict[str, Any], choice: tuple[int, int, int],
          holders: Mapping[FileKey, Any], twins: Mapping[FileKey, tuple[int, int]]) -> dict[str, Any]:
    """``template`` (this rank's new pieces) filled from the rank files of ``choice``: one file
    of each class of twins, this node's where it holds one."""
    rnd, step, world = choice
    local = set(memory.files.held())
    one: dict[int, FileKey] = {}
    for key in sorted((k for k in twins if k[:2] == (rnd, step) and k[3] == world), key=lambda k: k not in local):
        one.setdefault(twins[key][0], key)
    keys = [one[c] for c in sorted(one)]
    read = _Reader(memory, holders, local)
    heads = [read.head(k) for k in keys]
    flat, mappings = flatten_state_dict(template)
    if set(flat) != set(heads[0][0]["entries"]):
        raise ShardError(f"the snapshot of step {step} holds other entries than the state "
                         f"(e.g. {sorted(set(flat) ^ set(heads[0][0]['entries']))[:3]})")
    order = sorted(range(len(keys)), key=lambda r: keys[r] not in local)  # local pieces first
    for name, value in flat.items():
        if isinstance(value, DTensor):
            chunk = value.__create_chunk_list__()[0]
            store.fill_piece(name, value.to_local(), list(chunk.offsets),
                             [(keys[r], heads[r][0]["entries"][name], heads[r][1]) for r in order], read)
        elif isinstance(value, torch.Tensor):
            r = order[0]
            store.fill_piece(name, value, [0] * value.dim(),
                             [(keys[r], heads[r][0]["entries"][name], heads[r][1])], read)
        else:
            entry = heads[0][0]["entries"][name]
            if entry["t"] != "value":
                raise ShardError(f"{name}: a tensor in the snapshot, a value in the state")
            flat[name] = tuple(entry["value"]) if isinstance(value, tuple) else entry["value"]
    return unflatten_state_dict(flat, mappings)


class _Reader:
    """Byte ranges of the chosen rank files: from this node's files, else from a holder's port."""

    def __init__(self, memory: ShardedMemory, holders: Mapping[FileKey, Any], local: set[FileKey]) -> None:
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


def _say_resumed(choice: tuple[int, int, int], took: dict[str, float]) -> None:
    """The resume line, with where its time went (``took``: phase -> when it ended)."""
    marks = list(took.items())
    log.info("resumed from the in-memory shards of round %d step %d in %.2fs (%s)", choice[0], choice[1],
             marks[-1][1] - marks[0][1],
             ", ".join(f"{name} {t - marks[i][1]:.2f}s" for i, (name, t) in enumerate(marks[1:])))


def _message(raw: bytes) -> dict[str, Any]:
    """Another rank's part of the agreement (JSON), its fields checked."""
    msg = json.loads(raw)
    address = msg.get("address")
    files = [f for f in msg.get("files") or [] if isinstance(f, list) and len(f) == 7
             and all(type(v) is int and v >= 0 for v in f) and f[2] < f[3] and f[5] < f[6] <= f[3]]
    layout = msg.get("layout")
    endpoints = [(e[0], e[1]) for e in msg.get("endpoints") or []
                 if isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and type(e[1]) is int]
    return {"completed": int(msg.get("completed", -1)), "address": address if isinstance(address, str) else None,
            "files": files, "endpoints": endpoints, "layout": layout if isinstance(layout, str) else None}


def from_env(environ: Mapping[str, str], every: int | None, build_model: Callable[[], torch.nn.Module] | None,
             round_number: int) -> ShardedMemory | None:
    """This rank's sharded snapshots under the agent (``ELASTIC_AGENT_SNAPSHOT_DIR``), else None."""
    directory = environ.get(SNAPSHOT_DIR_ENV)
    if not directory:
        return None
    return ShardedMemory(Path(directory), environ.get("TORCHELASTIC_RUN_ID", ""), every, build_model,
                         node=environ.get(NODE_ID_ENV, "node"), local_rank=int(environ.get("LOCAL_RANK", "0")),
                         local_world=int(environ.get("LOCAL_WORLD_SIZE", "1")), round_number=round_number)
