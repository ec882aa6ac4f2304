"""Atomic checkpoints in a directory: save, find the latest complete one, keep the last N. No torch.

Layout, for step 42::

    <dir>/step_000000000042/                 payload files (any names, written by the caller)
    <dir>/step_000000000042.manifest.json    {"v": 1, "step": 42, "round": 3, "time": ...,
                                              "files": {"state.pt": {"size": ..., "sha256": ...}}}

The manifest is the commit point: it is written last (temp name, fsync, rename, fsync of the
directory), so a checkpoint either has a manifest that matches its files or it is skipped.
A crash at any moment leaves the previous complete checkpoint loadable.

"Latest" is by (round, step), not step alone (``manifest.order_key``): a worker of an old
round that saved a higher step during its stop grace period is not newer than the running
round's checkpoints, and ``keep_last`` never deletes the running round's work for it.

Fencing: a save carries the agent round; it is refused with ``StaleCheckpointError``, before
anything is written and again just before the commit rename, when the directory's fence file
(``agent.worker.manifest``, its fence) or any complete checkpoint names a newer round. A save with
``round_number=None`` (plain torchrun, no agent) is not fenced.

Only one process (global rank 0) commits; any number may read. The payload of a sharded
checkpoint is written by every rank through DCP (``agent.worker.sharded``) into a temporary
directory that rank 0 then commits with :func:`commit_dir`, the same rule as :func:`save`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO, Union

from agent.worker.manifest import (
    MANIFEST_VERSION,
    Checkpoint,
    CheckpointError,
    FileEntry,
    StaleCheckpointError,
    check_file_name,
    described,
    fsync_dir,
    log,
    manifest_document,
    manifest_name,
    order_key,
    read_fence,
    scan,
    sha256_of,
    step_dir_name,
    verify,
    write_json,
)

__all__ = [
    "MANIFEST_VERSION", "Checkpoint", "CheckpointError", "FileEntry", "Payload", "StaleCheckpointError",
    "commit_dir", "complete_checkpoints", "discard", "keep_last", "latest_step", "load_latest", "manifest_name",
    "order_key", "refuse_if_stale", "save", "step_dir_name", "temp_name",
]

# A payload file: its bytes, or a function that writes them to an open binary file.
Payload = Union[bytes, Callable[[BinaryIO], None]]


# ---------------------------------------------------------------------------------------------
# Saving


def save(
    directory: str | os.PathLike[str],
    step: int,
    payload: Mapping[str, Payload],
    *,
    round_number: int | None,
    now: Callable[[], float] = time.time,
) -> Checkpoint:
    """Write the checkpoint of ``step`` atomically and return it.

    A complete checkpoint of the same step is replaced (its manifest goes first, so a crash
    in between leaves the previous step as the latest complete one).
    """
    directory = Path(directory)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint step ({step!r}) must be a non-negative integer")
    if not payload:
        raise CheckpointError(f"checkpoint of step {step} has no files to write")
    for name in payload:
        check_file_name(name, f"payload of step {step}")
    directory.mkdir(parents=True, exist_ok=True)
    refuse_if_stale(directory, round_number)

    temp = directory / temp_name(step)
    try:
        temp.mkdir()
        for name, data in payload.items():
            _write_file(temp / name, data)
    except BaseException:
        discard(temp)
        raise
    return commit_dir(directory, step, temp, round_number=round_number, now=now)


def temp_name(step: int) -> str:
    """A fresh temporary name for the payload directory of ``step`` (``keep_last`` knows it)."""
    return f".tmp-{step_dir_name(step)}-{os.getpid()}-{secrets.token_hex(4)}"


def discard(temp: Path) -> None:
    shutil.rmtree(temp, ignore_errors=True)


def commit_dir(
    directory: Path,
    step: int,
    temp: Path,
    *,
    round_number: int | None,
    now: Callable[[], float] = time.time,
) -> Checkpoint:
    """Commit ``temp``, a directory of payload files already written and fsynced (by this
    process, or by every rank through DCP), as the checkpoint of ``step``: hash each file from
    disk, check the fence again, rename it to ``step_N`` and write the manifest last. On any
    failure ``temp`` is removed and nothing is committed."""
    try:
        files = {}
        for entry in sorted(os.scandir(temp), key=lambda e: e.name):
            check_file_name(entry.name, f"payload of step {step}")
            if not entry.is_file(follow_symlinks=False):
                raise CheckpointError(f"payload of step {step}: {entry.path} is not a plain file")
            # Hash what is on disk, not what we meant to write.
            files[entry.name] = FileEntry(entry.stat().st_size, sha256_of(Path(entry.path)))
        if not files:
            raise CheckpointError(f"checkpoint of step {step} has no files to write")
        fsync_dir(temp)
        # Checked again just before committing: the window for a zombie is the rename alone.
        refuse_if_stale(directory, round_number)
        final = directory / step_dir_name(step)
        manifest = directory / manifest_name(step)
        if manifest.exists():
            manifest.unlink()
            fsync_dir(directory)
        if final.exists():
            shutil.rmtree(final)
        os.rename(temp, final)
        fsync_dir(directory)
    except BaseException:
        discard(temp)
        raise

    checkpoint = Checkpoint(directory, step, round_number, now(), files)
    write_json(checkpoint.manifest_path, manifest_document(checkpoint), indent=1)
    return checkpoint


def _write_file(path: Path, data: Payload) -> None:
    with open(path, "xb") as handle:
        if isinstance(data, (bytes, bytearray, memoryview)):
            handle.write(data)
        else:
            data(handle)
        handle.flush()
        os.fsync(handle.fileno())


def refuse_if_stale(directory: Path, round_number: int | None) -> None:
    """Raise ``StaleCheckpointError`` when the fence or a complete checkpoint names a round
    newer than ``round_number``; never for ``None`` (plain torchrun)."""
    if round_number is None:
        return
    fence = read_fence(directory)
    if fence is not None and fence > round_number:
        raise StaleCheckpointError(directory, round_number, fence, None)
    for checkpoint in complete_checkpoints(directory):
        if checkpoint.round_number is not None and checkpoint.round_number > round_number:
            raise StaleCheckpointError(directory, round_number, checkpoint.round_number, checkpoint.step)


# ---------------------------------------------------------------------------------------------
# Reading


def load_latest(directory: str | os.PathLike[str]) -> Checkpoint | None:
    """The newest complete checkpoint by (round, step), every file checked against its size
    and sha256; None when there is none. Each bad manifest, payload without a manifest and
    newer checkpoint passed over is logged as a warning that names the offending file."""
    return _latest(Path(directory), check_hashes=True)


def latest_step(directory: str | os.PathLike[str], *, check_hashes: bool = True) -> int | None:
    """The step ``load_latest`` would resume from, for the agent (no torch, no payload parsing).
    ``check_hashes=False`` checks sizes only: cheap for large checkpoints, blind to bit flips."""
    checkpoint = _latest(Path(directory), check_hashes=check_hashes)
    return None if checkpoint is None else checkpoint.step


def complete_checkpoints(directory: str | os.PathLike[str], *, check_hashes: bool = False) -> list[Checkpoint]:
    """Every complete checkpoint, oldest first by (round, step): the last is the latest.
    Incomplete ones are left out silently."""
    out = []
    for checkpoint in reversed(described(Path(directory), warn=False)):
        try:
            verify(checkpoint, check_hashes=check_hashes)
        except CheckpointError:
            continue
        out.append(checkpoint)
    return out


def _latest(directory: Path, *, check_hashes: bool) -> Checkpoint | None:
    for checkpoint in described(directory, warn=True):
        try:
            verify(checkpoint, check_hashes=check_hashes)
        except CheckpointError as exc:
            log.warning("%s; skipped, trying an older checkpoint", exc)
            continue
        return checkpoint
    return None


# ---------------------------------------------------------------------------------------------
# Retention


def _loadable(checkpoint: Checkpoint, verified: Checkpoint | None) -> bool:
    if verified is not None and (checkpoint.path, checkpoint.round_number, checkpoint.files) == (
            verified.path, verified.round_number, verified.files):
        return True
    try:
        verify(checkpoint, check_hashes=True)
    except CheckpointError as exc:
        log.warning("%s; not counted as a checkpoint to keep", exc)
        return False
    return True


def keep_last(directory: str | os.PathLike[str], n: int, *, verified: Checkpoint | None = None) -> list[int]:
    """Delete all but the ``n`` newest complete checkpoints by (round, step) (sizes checked,
    not hashes), and the leftovers (no manifest, bad manifest, unfinished temporaries) of a
    step below every kept checkpoint's step. Never deletes the newest loadable checkpoint:
    when none of the ``n`` kept passes its sha256 check (a bit flipped since), the newest
    older one that does is kept too. ``verified``: the checkpoint this process has just saved
    (its files were hashed from disk), so the usual call hashes nothing more. Returns the
    steps of the complete checkpoints deleted, oldest first."""
    directory = Path(directory)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CheckpointError(f"keep_last n ({n!r}) must be an integer >= 1")
    complete = complete_checkpoints(directory)
    if not complete:
        return []
    keeping = complete[-n:]
    if not any(_loadable(c, verified) for c in reversed(keeping)):
        older = next((c for c in reversed(complete[:-n]) if _loadable(c, verified)), None)
        keeping = keeping if older is None else [older, *keeping]
    kept = {c.step for c in keeping}
    deleted = [c.step for c in complete if c.step not in kept]
    # A leftover may be a save in progress: only those below everything kept can go.
    floor = min(kept)
    listing = scan(directory)
    for step in sorted(set(listing.manifests) | set(listing.step_dirs)):
        if step in kept or (step >= floor and step not in deleted):
            continue
        # Manifest first: a checkpoint half-deleted is incomplete, never wrong.
        if step in listing.manifests:
            listing.manifests[step].unlink(missing_ok=True)
        if step in listing.step_dirs:
            shutil.rmtree(listing.step_dirs[step], ignore_errors=True)
    for step, path in listing.temps:
        if step < floor:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    fsync_dir(directory)
    return deleted
