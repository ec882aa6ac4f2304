"""Which checkpoint a round resumes from, chosen once, by global rank 0, for every rank. No torch.

Each rank picking "the latest" itself goes wrong on a shared (network) filesystem: a save
committed while the ranks look, or a directory listing cached on one node, gives ranks
different steps, and they diverge or hang; and every rank hashing and then loading the file
reads it twice. Instead (:func:`load_agreed`):

1. Global rank 0 walks the complete checkpoints newest first by (round, step) and reads each
   payload file once: it checks the size and sha256 of the bytes it read; a checkpoint whose
   manifest or files do not match is skipped with a warning that names the file.
2. It raises the directory's fence to its round (``agent.worker.manifest``, its fence), so a late save of an
   older round is refused from now on, and announces its choice: ``{"v": 1, "step", "round",
   "sha256": {file: digest}}``, ``{"v": 1, "step": None}`` (start from scratch) or ``{"v": 1,
   "error": ...}``.
3. Every other rank loads exactly that checkpoint: its manifest must name the same round and
   digests, each wanted file is read once and its size checked (no hashing). A rank that
   cannot find it raises ``CheckpointNotSharedError``: the directory must be shared by every node.
4. Every rank deserializes its bytes, then all agree: when any rank failed, every rank raises,
   so nobody is left waiting in the first collective of training.

The collectives are a parameter (``Collective``); ``agent.worker.helper`` backs them with
``torch.distributed``. Without one (a single process) step 1 alone runs, as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.worker.manifest import (
    Checkpoint,
    CheckpointError,
    check_digest,
    check_size,
    check_sizes,
    described,
    file_sha256,
    log,
    manifest_name,
    raise_fence,
    read_manifest,
)

CHOICE_VERSION = 1
T = TypeVar("T")


class CheckpointNotSharedError(CheckpointError):
    """A rank cannot find, or finds another, checkpoint than the one global rank 0 chose."""


class Collective(Protocol):
    def broadcast(self, obj: Any) -> Any:
        """Global rank 0's ``obj`` on every rank."""

    def agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank."""


@dataclass(frozen=True)
class Loaded:
    """A checkpoint and the bytes of the files asked for, each read once."""

    checkpoint: Checkpoint
    payload: Mapping[str, bytes]


def load_agreed(
    directory: Path | None,
    round_number: int | None,
    *,
    rank: int,
    names: Collection[str],
    deserialize: Callable[[Loaded], T],
    collective: Collective | None = None,
) -> tuple[Checkpoint, T] | None:
    """The checkpoint every rank resumes from and ``deserialize`` of its files ``names``, or
    None (no checkpoint). Collective when ``collective`` is given: call on every rank."""
    failure: Exception | None = None
    loaded: Loaded | None = None
    if collective is None or rank == 0:
        try:
            loaded = choose(directory, names) if directory is not None else None
            if directory is not None and round_number is not None:
                record_round(directory, round_number)
            message = announcement(loaded)
        except Exception as exc:  # every rank must learn of it, or the others would wait forever
            failure, message = exc, {"v": CHOICE_VERSION, "error": f"{type(exc).__name__}: {exc}"}
        if collective is not None:
            collective.broadcast(message)
    else:
        message = collective.broadcast(None)
        try:
            loaded = follow(directory, message, names, rank=rank)
        except Exception as exc:
            failure = exc
    result = None
    if failure is None and loaded is not None:
        try:
            result = (loaded.checkpoint, deserialize(loaded))
        except Exception as exc:
            failure = exc
    if collective is not None and collective.agree(failure is not None) and failure is None:
        failure = CheckpointError(f"rank {rank}: another rank could not load the checkpoint chosen in "
                                  f"{directory}; its own error says why")
    if failure is not None:
        raise failure
    return result


def choose(directory: Path, names: Collection[str]) -> Loaded | None:
    """The newest complete checkpoint by (round, step), every file read once and checked
    (size and sha256 of the bytes read), with the bytes of ``names``; None when there is none."""
    for checkpoint in described(directory, warn=True):
        for name in names:
            checkpoint.file(name)  # a checkpoint without the file asked for is an error, not skipped
        try:
            check_sizes(checkpoint)  # one stat each: a torn write is found before anything is read
            payload = {}
            for name in checkpoint.files:
                if name in names:
                    payload[name] = data = _read(checkpoint, name)
                    check_digest(checkpoint, name, hashlib.sha256(data).hexdigest())
                else:
                    check_digest(checkpoint, name, file_sha256(checkpoint, name))
        except CheckpointError as exc:
            log.warning("%s; skipped, trying an older checkpoint", exc)
            continue
        return Loaded(checkpoint, payload)
    return None


def announcement(loaded: Loaded | None) -> dict[str, Any]:
    if loaded is None:
        return {"v": CHOICE_VERSION, "step": None}
    c = loaded.checkpoint
    return {"v": CHOICE_VERSION, "step": c.step, "round": c.round_number,
            "sha256": {name: entry.sha256 for name, entry in sorted(c.files.items())}}


def follow(directory: Path | None, message: Any, names: Collection[str], *, rank: int) -> Loaded | None:
    """Load exactly the checkpoint rank 0 announced in ``message``: size checks, one read of each
    file in ``names``, no hashing."""
    if not isinstance(message, dict) or message.get("v") != CHOICE_VERSION:
        raise CheckpointError(f"rank {rank}: rank 0 announced {message!r}, expected a choice of version "
                              f"{CHOICE_VERSION} (do all ranks run the same elastic-agent?)")
    if message.get("error") is not None:
        raise CheckpointError(f"rank {rank}: rank 0 could not choose a checkpoint: {message['error']}")
    step = message.get("step")
    if step is None:
        return None

    def not_shared(what: str) -> CheckpointNotSharedError:
        return CheckpointNotSharedError(
            f"rank {rank} cannot load the checkpoint rank 0 chose (step {step}, round {message.get('round')}) "
            f"from {directory}: {what}. The checkpoint directory must be shared by every node "
            f"(one filesystem, mounted at the same path on each)")

    if directory is None:
        raise not_shared("this rank has no checkpoint directory")
    path = directory / manifest_name(step)
    try:
        checkpoint = read_manifest(directory, path, step)
    except CheckpointError as exc:
        raise not_shared(str(exc)) from exc
    digests = {name: entry.sha256 for name, entry in sorted(checkpoint.files.items())}
    if checkpoint.round_number != message.get("round") or digests != message.get("sha256"):
        raise not_shared(f"its manifest {path} describes another checkpoint (round "
                         f"{checkpoint.round_number}, files {digests})")
    try:
        check_sizes(checkpoint, [name for name in checkpoint.files if name not in names])
        return Loaded(checkpoint, {name: _read(checkpoint, name) for name in names})
    except CheckpointError as exc:
        raise not_shared(str(exc)) from exc


def _read(checkpoint: Checkpoint, name: str) -> bytes:
    path = checkpoint.file(name)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({exc.strerror})") from exc
    check_size(checkpoint, name, len(data))  # the file may have changed since it was listed
    return data


def record_round(directory: Path, round_number: int) -> None:
    """The fence file names ``round_number``: saves of older rounds are refused (best effort)."""
    try:
        raise_fence(directory, round_number)
    except OSError as exc:
        # Not fatal: a save of an older round is still refused once this round has checkpointed.
        log.warning("cannot record round %d in the fence file of %s (%s); an older round's late save is "
                    "refused only once this round has saved", round_number, directory, exc)


# ---------------------------------------------------------------------------------------------
# Where a new process group resumes from (agent.worker.held)

Key = tuple[int, int]  # (round, step): a later round wins over a higher step, as for checkpoints


@dataclass(frozen=True)
class Source:
    """``kind``: "memory" (``rank`` broadcasts the state it holds), "snapshot" (``rank``
    loads its node's snapshot and broadcasts it) or "disk" (the newest checkpoint, or the
    beginning when there is none)."""

    kind: str
    rank: int | None = None


def newest_source(memory: Sequence[Key | None], snapshots: Sequence[Key | None], disk: Key | None) -> Source:
    """The one rule: the newest (round, step) across the state ranks hold in memory, the
    snapshots nodes offer and the newest complete checkpoint on disk. On a tie memory wins
    (nothing to read), then disk (its checksums are verified), then a snapshot. A rank idle
    in an old round never rolls the job back past a newer checkpoint or snapshot."""
    candidates: list[tuple[Key, int, Source]] = []
    candidates += [(key, 2, Source("memory", rank)) for rank, key in enumerate(memory) if key is not None]
    if disk is not None:
        candidates.append((disk, 1, Source("disk")))
    candidates += [(key, 0, Source("snapshot", rank)) for rank, key in enumerate(snapshots) if key is not None]
    if not candidates:
        return Source("disk")
    # Highest key, then the preferred kind, then the lowest rank (every rank computes the same).
    return max(candidates, key=lambda c: (c[0], c[1], -(c[2].rank or 0)))[2]
