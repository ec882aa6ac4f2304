"""Atomic checkpoints in a directory: save, find the latest complete one, keep the last N. No torch.

Layout, for step 42::

    <dir>/step_000000000042/                 payload files (any names, written by the caller)
    <dir>/step_000000000042.manifest.json    {"v": 1, "step": 42, "round": 3, "time": ...,
                                              "files": {"state.pt": {"size": ..., "sha256": ...}}}

The manifest is the commit point: it is written last (temp name, fsync, rename, fsync of the
directory), so a checkpoint either has a manifest that matches its files or it is skipped.
A crash at any moment leaves the previous complete checkpoint loadable.

Fencing: a save carries the agent round; it is refused with ``StaleCheckpointError``, before
anything is written, when the directory already holds a complete checkpoint of a newer round.
A save with ``round_number=None`` (plain torchrun, no agent) is not fenced.

Only one process (global rank 0) saves; any number may read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
_STEP_DIGITS = 12
_STEP_DIR = re.compile(r"^step_(\d+)$")
_MANIFEST = re.compile(r"^step_(\d+)\.manifest\.json$")
_TEMP = re.compile(r"^\.tmp-step_(\d+)")
_HASH_CHUNK = 1 << 20

# A payload file: its bytes, or a function that writes them to an open binary file.
Payload = Union[bytes, Callable[[BinaryIO], None]]


class CheckpointError(Exception):
    """A checkpoint could not be written, or a manifest or file does not match what was expected."""


class StaleCheckpointError(CheckpointError):
    """A save from round ``round_number`` was refused: the directory holds a newer round's checkpoint."""

    def __init__(self, directory: Path, round_number: int, newer_round: int, newer_step: int) -> None:
        super().__init__(
            f"refusing to save a checkpoint of round {round_number} in {directory}: it already holds "
            f"a complete checkpoint of round {newer_round} (step {newer_step}); this worker belongs "
            f"to an older round and must stop"
        )
        self.directory = directory
        self.round_number = round_number
        self.newer_round = newer_round
        self.newer_step = newer_step


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as its manifest describes it."""

    directory: Path  # the checkpoint directory (the parent of ``path``)
    step: int
    round_number: int | None
    time: float
    files: Mapping[str, FileEntry]

    @property
    def path(self) -> Path:
        return self.directory / step_dir_name(self.step)

    @property
    def manifest_path(self) -> Path:
        return self.directory / manifest_name(self.step)

    def file(self, name: str) -> Path:
        if name not in self.files:
            raise CheckpointError(f"checkpoint {self.path} has no file {name!r} (it has {sorted(self.files)})")
        return self.path / name


def step_dir_name(step: int) -> str:
    return f"step_{step:0{_STEP_DIGITS}d}"


def manifest_name(step: int) -> str:
    return f"{step_dir_name(step)}.manifest.json"


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
        _check_file_name(name, f"payload of step {step}")
    directory.mkdir(parents=True, exist_ok=True)
    _refuse_if_stale(directory, round_number)

    temp = directory / f".tmp-{step_dir_name(step)}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        temp.mkdir()
        files = {name: _write_file(temp / name, data) for name, data in payload.items()}
        _fsync_dir(temp)
        # Checked again just before committing: the window for a zombie is the rename alone.
        _refuse_if_stale(directory, round_number)
        final = directory / step_dir_name(step)
        manifest = directory / manifest_name(step)
        if manifest.exists():
            manifest.unlink()
            _fsync_dir(directory)
        if final.exists():
            shutil.rmtree(final)
        os.rename(temp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise

    checkpoint = Checkpoint(directory, step, round_number, now(), files)
    _write_manifest(checkpoint)
    return checkpoint


def _write_file(path: Path, data: Payload) -> FileEntry:
    with open(path, "xb") as handle:
        if isinstance(data, (bytes, bytearray, memoryview)):
            handle.write(data)
        else:
            data(handle)
        handle.flush()
        os.fsync(handle.fileno())
    # Hash what is on disk, not what we meant to write.
    return FileEntry(path.stat().st_size, _sha256(path))


def _write_manifest(checkpoint: Checkpoint) -> None:
    document = {
        "v": MANIFEST_VERSION,
        "step": checkpoint.step,
        "round": checkpoint.round_number,
        "time": checkpoint.time,
        "files": {n: {"size": e.size, "sha256": e.sha256} for n, e in sorted(checkpoint.files.items())},
    }
    final = checkpoint.manifest_path
    temp = checkpoint.directory / f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(temp, "x", encoding="utf-8") as handle:
            json.dump(document, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(checkpoint.directory)


def _refuse_if_stale(directory: Path, round_number: int | None) -> None:
    if round_number is None:
        return
    for checkpoint in _complete(directory, check_hashes=False):
        if checkpoint.round_number is not None and checkpoint.round_number > round_number:
            raise StaleCheckpointError(directory, round_number, checkpoint.round_number, checkpoint.step)


# ---------------------------------------------------------------------------------------------
# Reading


def load_latest(directory: str | os.PathLike[str]) -> Checkpoint | None:
    """The complete checkpoint of the highest step, every file checked against its size and
    sha256; None when there is none. Each newer checkpoint passed over is logged as a warning
    that names the offending file."""
    return _latest(Path(directory), check_hashes=True)


def latest_step(directory: str | os.PathLike[str], *, check_hashes: bool = True) -> int | None:
    """The step ``load_latest`` would resume from, for the agent (no torch, no payload parsing).
    ``check_hashes=False`` checks sizes only: cheap for large checkpoints, blind to bit flips."""
    checkpoint = _latest(Path(directory), check_hashes=check_hashes)
    return None if checkpoint is None else checkpoint.step


def complete_checkpoints(directory: str | os.PathLike[str], *, check_hashes: bool = False) -> list[Checkpoint]:
    """Every complete checkpoint, oldest step first. Incomplete ones are left out silently."""
    return _complete(Path(directory), check_hashes=check_hashes)


def _latest(directory: Path, *, check_hashes: bool) -> Checkpoint | None:
    manifests, step_dirs, _ = _scan(directory)
    for step in sorted(set(manifests) | set(step_dirs), reverse=True):
        if step not in manifests:
            log.warning("checkpoint %s has no manifest (unfinished save?); skipped", step_dirs[step])
            continue
        try:
            checkpoint = _read_manifest(directory, manifests[step], step)
            _verify(checkpoint, check_hashes=check_hashes)
        except CheckpointError as exc:
            log.warning("%s; skipped, trying an older checkpoint", exc)
            continue
        return checkpoint
    return None


def _complete(directory: Path, *, check_hashes: bool) -> list[Checkpoint]:
    manifests, _, _ = _scan(directory)
    out = []
    for step in sorted(manifests):
        try:
            checkpoint = _read_manifest(directory, manifests[step], step)
            _verify(checkpoint, check_hashes=check_hashes)
        except CheckpointError:
            continue
        out.append(checkpoint)
    return out


def _scan(directory: Path) -> tuple[dict[int, Path], dict[int, Path], list[tuple[int, Path]]]:
    """Manifests by step, payload directories by step, and leftover temporary entries."""
    manifests: dict[int, Path] = {}
    step_dirs: dict[int, Path] = {}
    temps: list[tuple[int, Path]] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return manifests, step_dirs, temps
    for entry in entries:
        if match := _MANIFEST.match(entry.name):
            manifests[int(match.group(1))] = Path(entry.path)
        elif (match := _STEP_DIR.match(entry.name)) and entry.is_dir(follow_symlinks=False):
            step_dirs[int(match.group(1))] = Path(entry.path)
        elif match := _TEMP.match(entry.name):
            temps.append((int(match.group(1)), Path(entry.path)))
    return manifests, step_dirs, temps


def _read_manifest(directory: Path, path: Path, step: int) -> Checkpoint:
    try:
        document = json.loads(path.read_bytes())
    except OSError as exc:
        raise CheckpointError(f"checkpoint manifest {path} cannot be read: {exc.strerror}") from exc
    except ValueError as exc:
        raise CheckpointError(f"checkpoint manifest {path} is not valid JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise CheckpointError(f"checkpoint manifest {path} must hold a JSON object, found {type(document).__name__}")
    if document.get("v") != MANIFEST_VERSION:
        raise CheckpointError(
            f"checkpoint manifest {path} has version {document.get('v')!r}, expected {MANIFEST_VERSION}"
        )
    if document.get("step") != step:
        raise CheckpointError(f"checkpoint manifest {path} says step {document.get('step')!r}, its name says {step}")
    round_number = document.get("round")
    if round_number is not None and (isinstance(round_number, bool) or not isinstance(round_number, int)):
        raise CheckpointError(f"checkpoint manifest {path}: 'round' must be an integer or null, found {round_number!r}")
    saved_at = document.get("time")
    if isinstance(saved_at, bool) or not isinstance(saved_at, (int, float)):
        raise CheckpointError(f"checkpoint manifest {path}: 'time' must be a number, found {saved_at!r}")
    raw_files = document.get("files")
    if not isinstance(raw_files, dict) or not raw_files:
        raise CheckpointError(f"checkpoint manifest {path}: 'files' must be a non-empty object, found {raw_files!r}")
    files = {}
    for name, entry in raw_files.items():
        _check_file_name(name, f"checkpoint manifest {path}")
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or not isinstance(digest, str):
            raise CheckpointError(
                f"checkpoint manifest {path}: file {name!r} needs 'size' and 'sha256', found {entry!r}"
            )
        files[name] = FileEntry(size, digest)
    return Checkpoint(directory, step, round_number, float(saved_at), files)


def _verify(checkpoint: Checkpoint, *, check_hashes: bool) -> None:
    for name, expected in checkpoint.files.items():
        path = checkpoint.path / name
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise CheckpointError(f"checkpoint file {path} is missing ({exc.strerror})") from exc
        if size != expected.size:
            raise CheckpointError(
                f"checkpoint file {path} has {size} bytes, its manifest says {expected.size} (truncated?)"
            )
        if check_hashes:
            try:
                digest = _sha256(path)
            except OSError as exc:
                raise CheckpointError(f"checkpoint file {path} cannot be read ({exc.strerror})") from exc
            if digest != expected.sha256:
                raise CheckpointError(
                    f"checkpoint file {path} has sha256 {digest}, its manifest says {expected.sha256}"
                )


# ---------------------------------------------------------------------------------------------
# Retention


def keep_last(directory: str | os.PathLike[str], n: int) -> list[int]:
    """Delete all but the ``n`` newest complete checkpoints (sizes checked, not hashes), and the
    leftovers (no manifest, bad manifest, unfinished temporaries) older than the oldest kept.
    Never deletes the newest complete checkpoint. Returns the steps of the complete
    checkpoints deleted."""
    directory = Path(directory)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CheckpointError(f"keep_last n ({n!r}) must be an integer >= 1")
    complete = _complete(directory, check_hashes=False)
    if not complete:
        return []
    oldest_kept = complete[-n:][0].step
    deleted = [c.step for c in complete if c.step < oldest_kept]
    manifests, step_dirs, temps = _scan(directory)
    for step in sorted(set(manifests) | set(step_dirs)):
        if step >= oldest_kept:
            continue
        # Manifest first: a checkpoint half-deleted is incomplete, never wrong.
        if step in manifests:
            manifests[step].unlink(missing_ok=True)
        if step in step_dirs:
            shutil.rmtree(step_dirs[step], ignore_errors=True)
    for step, path in temps:
        if step < oldest_kept:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    _fsync_dir(directory)
    return deleted


# ---------------------------------------------------------------------------------------------
# Small helpers


def _check_file_name(name: object, where: str) -> None:
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        raise CheckpointError(f"{where}: file name {name!r} must be a plain name (no '/', not starting with '.')")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
