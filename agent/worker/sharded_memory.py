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
- Every step with a peer that is no twin (``sync``, the default for plain FSDP), the file
  is written and pushed in the optimizer's post-step hook, and every rank waits for all
  before the script goes on (after_update): no step a script saw end is ever lost. Its
  unsharded entries are then taken again at the step's end (the scheduler has stepped) and
  kept apart, a small file per node; a recovery loads them from one rank, the same for all.
- When a group forms, every rank says which rank files its node holds (JSON). Rank 0 picks
  the newest (round, step) with a file of every class of twins held by some live node (and
  its unsharded entries, where kept apart, on a live rank), unless the newest disk
  checkpoint is newer. Every rank rebuilds the model on the new mesh
  (``build_model``; the optimizer keeps its object, its parameters re-pointed) and fills its
  new shards from the byte ranges of the old rank files that overlap them
  (agent.worker.shard_fill). No rank ever holds the whole model. If any rank cannot fill its
  shards (a file missing, corrupt, unreachable), every rank loads the same disk checkpoint
  instead, never a mix.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from agent.worker import shard_store as store
from agent.worker import sharded
from agent.worker import snapshot_wire as wire
from agent.worker.held import _all_gather_bytes, _any_rank, _broadcast_bytes, _newest_on_disk
from agent.worker.manifest import CheckpointError
from agent.worker.protocol import NODE_ID_ENV, SNAPSHOT_DIR_ENV
from agent.worker.shard_fill import fill, layout
from agent.worker.shard_store import FileKey, ShardError

log = logging.getLogger(__name__)

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
        self.sync = False  # every step, pushed from the optimizer's post-step hook (_pick_peer)

    # --- taking snapshots ------------------------------------------------------------------
    def after_step(self, step: int, round_number: int, state: Mapping[str, Any]) -> bool:
        if self.every <= 0 or (step + 1) % self.every != 0:
            return False
        if self.sync:  # the shards went in after_update; the values as the step left them
            self._keep_rest(round_number, step, state)
            return True
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

    def after_update(self, step: int, round_number: int, held: Any) -> None:
        """The optimizer's post-step hook (``sync``): this rank's file here and on the peer node,
        then every rank waits for all (collective), so no step a script saw end is lost; a
        step in flight is not done, its survivors roll back (docs/architecture.md, "No step
        lost without a twin")."""
        if not self.sync:
            return
        self.before_update()
        now, later = store.split({**state_of(held), "step": step}, self._buffers)
        key = (round_number, step, dist.get_rank(), dist.get_world_size())
        self._cancel = threading.Event()
        kept = self._keep(key, now, later, self.peer, self._cancel, rest=True)
        if _any_rank(not kept):  # collective: raises when a rank is gone
            log.warning("step %d's shards are not on two nodes for every rank: a node lost before step %d ends "
                        "costs this step", step, step + 1)
        self.taken = step

    def _keep_rest(self, round_number: int, step: int, state: Mapping[str, Any]) -> None:
        """The unsharded entries of ``state`` (values, small tensors) as the step left them."""
        try:
            at = (round_number, step)
            self.files.write_rest(at, store.packed(self.job, store.rest_key(at), store.split(state)[0]))
        except OSError as exc:  # its files are then passed over by a recovery: never loaded without it
            log.warning("the values of step %d not kept on this node: %s", step, exc)

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
              cancel: threading.Event, rest: bool = False) -> bool:
        """This node's file of ``key`` and, with a ``peer``, its copy there; whether they were kept.
        ``rest`` (after_update): the file says its unsharded entries are kept apart, and this
        node's copy is written behind, by a thread before_update waits for."""
        try:
            head, parts = store.pack(self.job, key, {**now, **store.copy_shards(later, self._buffers)}, self.twins,
                                     rest=rest)
            try:  # the peer's copy first: a loss of this node needs it; ours is waited for anyway
                if peer is not None and self.key is not None:
                    wire_head = {"node": self.node, "local_rank": self.local_rank, "round": key[0],
                                 "step": key[1], "kind": "shard", "rank": key[2], "world": key[3]}
                    wire.push(peer, wire_head, [memoryview(head), *parts], job=self.job, key=self.key,
                              cancel=cancel)
            finally:
                if rest:  # read only after before_update, which waits for it
                    self._thread = threading.Thread(target=_write, args=(self.files, key, head, parts), daemon=True,
                                                    name="shard-snapshot-writer")
                    self._thread.start()
                else:
                    self.files.write(key, head, *parts)
            return True
        except ShardError as exc:
            log.error("sharded snapshot of step %d failed: %s", key[1], exc)
        except Exception as exc:  # noqa: BLE001 - a failed snapshot never breaks training
            log.warning("sharded snapshot of step %d not kept whole: %s", key[1], exc)
        return False

    # --- the port --------------------------------------------------------------------------
    def serve(self, host: str) -> None:
        if self.server is None and self.key is not None:
            self.server = wire.PeerServer(self.files.keep_pushed, host, job=self.job, key=self.key,
                                          serve=self.files.serve,
                                          max_bytes=lambda: store.room(self.files.path.parent))
            self.address = self.server.address

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
                "rests": [list(k) for k in self.files.rests() if k[0] < round_number],
                "layout": layout(held.model.state_dict(), dist.get_rank())}
        everyone = [_message(raw) for raw in _all_gather_bytes(json.dumps(mine).encode())]
        held.endpoints = {e for rank in everyone for e in rank["endpoints"]}
        self._pick_peer([e["address"] for e in everyone],
                        store.classes([e["layout"] or f"rank {i}" for i, e in enumerate(everyone)]))
        holders, twins, apart, rests = _sources(everyone)
        choice = _decide(elastic, twins, apart, rests)
        took["agree"] = time.perf_counter()
        state, failure = _from_memory(self, held, choice, holders, twins) if choice is not None else (None, None)
        took["fill"] = time.perf_counter()
        if state is not None:
            load_state(held, state)
            took["load"] = time.perf_counter()
            held.completed = int(state["step"])
            self.files.drop_older(choice[:2])  # type: ignore[index]
            _say_resumed(choice, took)  # type: ignore[arg-type]
        else:
            _from_disk(held, elastic, everyone, failure)
        held.round = round_number
        self.mesh, self.taken = (round_number, dist.get_rank(), dist.get_world_size()), held.completed
        return held.completed

    def _keep_live(self, held: Any) -> None:
        """This survivor's state as it is, when it is newer than its last file (a cadence of
        more than one step), kept before the model is rebuilt: an HSDP replica then stands for
        its lost twin at the very step the job reached, and no rank rolls back to the last
        cadence step for want of its own pieces. Only an optimizer step changes the shards,
        and ``held.completed`` counts the ones that ran, so the file is that step's."""
        if self.every <= 0 or self.mesh is None:
            return
        rnd, rank, world = self.mesh
        if self.sync and held.completed >= 0 and (rnd, held.completed) not in self.files.rests():
            self._keep_rest(rnd, held.completed, state_of(held))  # the step ended in a failure after its update
        if held.completed <= self.taken:
            return
        now, later = store.split(state_of(held), self._buffers)
        self._keep((rnd, held.completed, rank, world), now, later, None, threading.Event())
        self.taken = held.completed

    def _pick_peer(self, addresses: list[str | None], classes: list[int]) -> None:
        """The rank on the next node gets a copy of this rank's files, unless it is a twin (an
        HSDP replica of the same shards): its own file then stands for ours, nothing is sent."""
        world, rank = len(addresses), dist.get_rank()
        self.twins = (classes[rank], max(classes) + 1)
        other = (rank + self.local_world) % world
        twin_elsewhere = world > self.local_world and classes[other] == classes[rank]
        self.peer = addresses[other] if world > self.local_world and not twin_elsewhere else None
        if twin_elsewhere:
            log.info("snapshots stay on this node: rank %d on the next node holds the same shards", other)
        if self.asked is None:  # a live twin elsewhere covers a node lost at any step (_keep_live)
            self.every = TWIN_EVERY if twin_elsewhere else 1
        self.sync = self.every == 1 and self.peer is not None


def _write(files: store.ShardDir, key: FileKey, head: bytes, parts: list[memoryview]) -> None:
    try:
        files.write(key, head, *parts)
    except Exception as exc:  # noqa: BLE001 - a failed snapshot never breaks training
        log.warning("sharded snapshot of step %d not kept on this node: %s", key[1], exc)


def _sources(everyone: list[dict[str, Any]]) -> tuple[dict[FileKey, list[tuple[str | None, int]]],
                                                        dict[FileKey, tuple[int, int]], set[tuple[int, int]],
                                                        dict[tuple[int, int], int]]:
    """From every rank's part of the agreement: who holds each rank file (address, size), its
    twins, the (round, step)s whose unsharded entries were kept apart, and for each of those
    the lowest rank that holds them."""
    holders: dict[FileKey, list[tuple[str | None, int]]] = {}
    twins: dict[FileKey, tuple[int, int]] = {}
    apart: set[tuple[int, int]] = set()
    for e in everyone:
        for *k, size, twin, classes, rest in e["files"]:
            holders.setdefault(tuple(k), []).append((e["address"], size))  # type: ignore[arg-type]
            twins.setdefault(tuple(k), (twin, classes))  # type: ignore[arg-type]
            if rest:
                apart.add((k[0], k[1]))
    rests: dict[tuple[int, int], int] = {}
    for rank, e in enumerate(everyone):
        for k in e["rests"]:
            rests.setdefault((k[0], k[1]), rank)
    return holders, twins, apart, rests


def _from_memory(memory: ShardedMemory, held: Any, choice: tuple[int, int, int, int],
                 holders: Mapping[FileKey, Any], twins: Mapping[FileKey, tuple[int, int]]
                 ) -> tuple[dict[str, Any] | None, str | None]:
    """Collective: this rank's state of ``choice`` from the rank files (None on every rank if
    any rank cannot fill its own), and why not."""
    rest, state, failure = None, None, None
    if choice[3] >= 0:  # the unsharded entries, as the step left them, from the rank that kept them
        rest = _broadcast_bytes(memory.files.read_rest(choice[:2]) if dist.get_rank() == choice[3] else None, choice[3])
    try:
        if choice[3] >= 0 and rest is None:
            raise ShardError(f"rank {choice[3]} no longer holds the values of step {choice[1]}")
        state = fill(memory, state_of(held), choice, holders, twins, rest)
    except (ShardError, OSError, KeyError) as exc:
        failure = str(exc)
    if _any_rank(failure is not None):
        failure = failure or "another rank's could not be loaded"
        log.warning("the in-memory shards of step %d cannot be loaded (%s); every rank resumes from disk",
                    choice[1], failure)
        return None, failure
    return state, None


def _from_disk(held: Any, elastic: Any, everyone: list[dict[str, Any]], failure: str | None) -> None:
    """Every rank loads the same disk checkpoint (none: from the start, unless the job had state)."""
    start, loaded = elastic.load(default=lambda: state_of(held))
    if start == 0 and any(e["completed"] >= 0 for e in everyone):
        raise CheckpointError(
            "the job's sharded state is lost: " + (f"the in-memory shards failed ({failure})" if failure else
                                                   "a node's shards are in no live node's memory")
            + " and there is no checkpoint on disk to resume from")
    if start > 0:
        load_state(held, loaded)
    held.completed = start - 1


def _decide(elastic: Any, twins: Mapping[FileKey, tuple[int, int]], apart: set[tuple[int, int]],
            rests: Mapping[tuple[int, int], int]) -> tuple[int, int, int, int] | None:
    """(round, step, world, rank) of the snapshot every rank loads, None for disk (rank 0's
    rule): the newest whose files, one of each class of twins, are all held somewhere, and
    whose unsharded entries, where they were kept apart, a rank holds (that rank; else -1)."""
    decision = None
    if dist.get_rank() == 0:
        found: dict[tuple[int, int, int], set[tuple[int, int]]] = {}
        for k, twin in twins.items():
            found.setdefault(k[:2] + (k[3],), set()).add(twin)
        best = max((s + (rests.get(s[:2], -1),) for s, held in found.items()
                    if store.every_class(held) and (s[:2] not in apart or s[:2] in rests)), default=None)
        try:
            disk = _newest_on_disk(elastic)
        except Exception as exc:  # noqa: BLE001 - the others wait on this choice
            log.warning("cannot list the checkpoints on disk (%s)", exc)
            disk = None
        if best is not None and disk is not None and disk >= best[:2]:
            best = None
        decision = json.dumps(best).encode()
    raw = json.loads(_broadcast_bytes(decision, 0) or b"null")
    return tuple(int(v) for v in raw) if isinstance(raw, list) and len(raw) == 4 else None  # type: ignore[return-value]


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
    files = [f for f in msg.get("files") or [] if isinstance(f, list) and len(f) == 8
             and all(type(v) is int and v >= 0 for v in f) and f[2] < f[3] and f[5] < f[6] <= f[3] and f[7] < 2]
    rests = [r for r in msg.get("rests") or [] if isinstance(r, list) and len(r) == 2
             and all(type(v) is int and v >= 0 for v in r)]
    layout = msg.get("layout")
    endpoints = [(e[0], e[1]) for e in msg.get("endpoints") or []
                 if isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and type(e[1]) is int]
    return {"completed": int(msg.get("completed", -1)), "address": address if isinstance(address, str) else None,
            "files": files, "rests": rests, "endpoints": endpoints,
            "layout": layout if isinstance(layout, str) else None}


def from_env(environ: Mapping[str, str], every: int | None, build_model: Callable[[], torch.nn.Module] | None,
             round_number: int) -> ShardedMemory | None:
    """This rank's sharded snapshots under the agent (``ELASTIC_AGENT_SNAPSHOT_DIR``), else None."""
    directory = environ.get(SNAPSHOT_DIR_ENV)
    if not directory:
        return None
    return ShardedMemory(Path(directory), environ.get("TORCHELASTIC_RUN_ID", ""), every, build_model,
                         node=environ.get(NODE_ID_ENV, "node"), local_rank=int(environ.get("LOCAL_RANK", "0")),
                         local_world=int(environ.get("LOCAL_WORLD_SIZE", "1")), round_number=round_number)
