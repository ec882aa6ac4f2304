"""A checkpoint directory as data: names, manifests, their checks, the order of checkpoints, and the fence. No torch.

``agent.worker.checkpoint`` (save, latest, retention) and ``agent.worker.choice`` (the one
choice every rank loads) both read the directory through this module, so there is one parser
of manifests and one idea of which checkpoint is newer: :func:`order_key`, (round, step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("agent.worker.checkpoint")  # one logger for everything about checkpoint files

MANIFEST_VERSION = 1
_STEP_DIGITS = 12
_STEP_DIR = re.compile(r"^step_(\d+)$")
_MANIFEST = re.compile(r"^step_(\d+)\.manifest\.json$")
_TEMP = re.compile(r"^\.tmp-step_(\d+)")
HASH_CHUNK = 1 << 20
_FLOAT_MAX = sys.float_info.max


class CheckpointError(Exception):
    """A checkpoint could not be written, or a manifest or file does not match what was expected."""


class StaleCheckpointError(CheckpointError):
    """A save from round ``round_number`` was refused: the directory holds a newer round's
    checkpoint (``newer_step`` is its step) or its fence file names a newer round (``newer_step`` None)."""

    def __init__(self, directory: Path, round_number: int, newer_round: int, newer_step: int | None) -> None:
        if newer_step is None:
            found = f"its fence file says round {newer_round} has loaded a checkpoint"
        else:
            found = f"it already holds a complete checkpoint of round {newer_round} (step {newer_step})"
        super().__init__(
            f"refusing to save a checkpoint of round {round_number} in {directory}: {found}; this "
            f"worker belongs to an older round and must stop"
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


def order_key(checkpoint: Checkpoint) -> tuple[bool, int, int]:
    """Newer sorts higher: a later round wins over a higher step (a fenced worker of an old
    round may have saved a higher step during its grace period); no round sorts below any."""
    return (checkpoint.round_number is not None, checkpoint.round_number or 0, checkpoint.step)


# ---------------------------------------------------------------------------------------------
# Reading the directory


@dataclass(frozen=True)
class Listing:
    """What a directory holds, by name alone: manifests and payload directories by step, and
    leftover temporaries (step, path)."""

    manifests: Mapping[int, Path]
    step_dirs: Mapping[int, Path]
    temps: list[tuple[int, Path]]


def scan(directory: Path) -> Listing:
    manifests: dict[int, Path] = {}
    step_dirs: dict[int, Path] = {}
    temps: list[tuple[int, Path]] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return Listing(manifests, step_dirs, temps)
    for entry in entries:
        if match := _MANIFEST.match(entry.name):
            manifests[int(match.group(1))] = Path(entry.path)
        elif (match := _STEP_DIR.match(entry.name)) and entry.is_dir(follow_symlinks=False):
            step_dirs[int(match.group(1))] = Path(entry.path)
        elif match := _TEMP.match(entry.name):
            temps.append((int(match.group(1)), Path(entry.path)))
    return Listing(manifests, step_dirs, temps)


def described(directory: Path, *, warn: bool) -> list[Checkpoint]:
    """Every checkpoint whose manifest parses, newest first by :func:`order_key`; nothing of
    its files is checked yet. With ``warn``, each bad manifest and each payload directory
    without one is logged as a warning that names it."""
    listing = scan(directory)
    found = []
    for step, path in listing.manifests.items():
        try:
            found.append(read_manifest(directory, path, step))
        except CheckpointError as exc:
            if warn:
                log.warning("%s; skipped", exc)
    if warn:
        for step in sorted(set(listing.step_dirs) - set(listing.manifests)):
            log.warning("checkpoint %s has no manifest (unfinished save?); skipped", listing.step_dirs[step])
    return sorted(found, key=order_key, reverse=True)


def read_manifest(directory: Path, path: Path, step: int) -> Checkpoint:
    try:
        document = json.loads(path.read_bytes())
    except OSError as exc:
        raise CheckpointError(f"checkpoint manifest {path} cannot be read: {exc.strerror}") from exc
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested too deep
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
    # Finite: a 400-digit integer would raise OverflowError in float() below.
    if (isinstance(saved_at, bool) or not isinstance(saved_at, (int, float))
            or not -_FLOAT_MAX <= saved_at <= _FLOAT_MAX):
        raise CheckpointError(f"checkpoint manifest {path}: 'time' must be a number, found {saved_at!r}")
    raw_files = document.get("files")
    if not isinstance(raw_files, dict) or not raw_files:
        raise CheckpointError(f"checkpoint manifest {path}: 'files' must be a non-empty object, found {raw_files!r}")
    files = {}
    for name, entry in raw_files.items():
        check_file_name(name, f"checkpoint manifest {path}")
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or not isinstance(digest, str):
            raise CheckpointError(
                f"checkpoint manifest {path}: file {name!r} needs 'size' and 'sha256', found {entry!r}"
            )
        files[name] = FileEntry(size, digest)
    return Checkpoint(directory, step, round_number, float(saved_at), files)


def manifest_document(checkpoint: Checkpoint) -> dict:
    return {
        "v": MANIFEST_VERSION,
        "step": checkpoint.step,
        "round": checkpoint.round_number,
        "time": checkpoint.time,
        "files": {n: {"size": e.size, "sha256": e.sha256} for n, e in sorted(checkpoint.files.items())},
    }


# ---------------------------------------------------------------------------------------------
# Checking files against a manifest


def check_sizes(checkpoint: Checkpoint, names: Iterable[str] | None = None) -> None:
    """Every file (or those ``names``) exists with the size its manifest says: one stat each."""
    for name in checkpoint.files if names is None else names:
        path = checkpoint.path / name
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise CheckpointError(f"checkpoint file {path} is missing ({exc.strerror})") from exc
        check_size(checkpoint, name, size)


def check_size(checkpoint: Checkpoint, name: str, size: int) -> None:
    expected = checkpoint.files[name].size
    if size != expected:
        raise CheckpointError(
            f"checkpoint file {checkpoint.path / name} has {size} bytes, its manifest says {expected} (truncated?)"
        )


def check_digest(checkpoint: Checkpoint, name: str, digest: str) -> None:
    expected = checkpoint.files[name].sha256
    if digest != expected:
        raise CheckpointError(
            f"checkpoint file {checkpoint.path / name} has sha256 {digest}, its manifest says {expected}"
        )


def verify(checkpoint: Checkpoint, *, check_hashes: bool) -> None:
    """Sizes of every file, and with ``check_hashes`` their sha256 (each file read once more)."""
    check_sizes(checkpoint)
    if not check_hashes:
        return
    for name in checkpoint.files:
        check_digest(checkpoint, name, file_sha256(checkpoint, name))


def file_sha256(checkpoint: Checkpoint, name: str) -> str:
    path = checkpoint.path / name
    try:
        return sha256_of(path)
    except OSError as exc:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({exc.strerror})") from exc


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Small helpers


# torch.distributed.checkpoint's metadata file: the one dot name a payload may hold.
DCP_METADATA = ".metadata"


def check_file_name(name: object, where: str) -> None:
    if name == DCP_METADATA:
        return
    if (
        not isinstance(name, str)
        or not name
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        raise CheckpointError(f"{where}: file name {name!r} must be a plain name (no '/', not starting with '.')")


def write_json(final: Path, document: object, *, indent: int | None = None) -> None:
    """Replace ``final`` atomically: a temporary name beside it, fsync, rename, fsync of the directory."""
    temp = final.with_name(f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(temp, "x", encoding="utf-8") as handle:
            json.dump(document, handle, indent=indent)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the fence -----------------------------------------------------------------------------
# The fence file of a checkpoint directory: the newest round that has loaded from it.
#
# ``<dir>/fence.json`` holds ``{"v": 1, "round": N}``. Global rank 0 of round N raises it to N
# once it has chosen the checkpoint its round resumes from; a save of an older round is then
# refused (``agent.worker.checkpoint.save``), even before round N wrote a checkpoint of its own.
# So a worker fenced off by the agent that saves late, in its grace period, can neither become
# the checkpoint the next round loads nor push a newer one out through ``keep_last``.
#
# The fence only goes up: a lower round never replaces a higher one. It is written like a
# manifest (temporary name, fsync, rename, fsync of the directory). A fence file that cannot be
# read or parsed is logged as a warning that names it and counts as no fence; the next raise
# replaces it. Two rounds raising at the same instant could still race (read, then rename);
# the agent never runs two rounds' workers at once beyond its stop grace period, and complete
# checkpoints fence by their own round as well.

FENCE_FILE = "fence.json"
FENCE_VERSION = 1


def fence_path(directory: Path) -> Path:
    return directory / FENCE_FILE


def read_fence(directory: Path) -> int | None:
    """The round the fence file names; None when there is none or it is unusable (warned)."""
    path = fence_path(directory)
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("checkpoint fence file %s cannot be read (%s); ignored", path, exc.strerror)
        return None
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested too deep
        log.warning("checkpoint fence file %s is not valid JSON (%s); ignored", path, exc)
        return None
    round_number = document.get("round") if isinstance(document, dict) else None
    if (
        not isinstance(document, dict)
        or document.get("v") != FENCE_VERSION
        or isinstance(round_number, bool)
        or not isinstance(round_number, int)
    ):
        log.warning("checkpoint fence file %s must hold {\"v\": %d, \"round\": <integer>}, found %.200r; ignored",
                    path, FENCE_VERSION, document)
        return None
    return round_number


def raise_fence(directory: Path, round_number: int) -> int:
    """Record ``round_number`` unless the fence already names it or a newer round; return the
    round the fence names afterwards."""
    current = read_fence(directory)
    if current is not None and current >= round_number:
        return current
    directory.mkdir(parents=True, exist_ok=True)
    write_json(fence_path(directory), {"v": FENCE_VERSION, "round": round_number})
    return round_number
