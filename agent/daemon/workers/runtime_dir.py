"""A node-local directory for the files the agent and its workers exchange many times a second.

Every rank replaces its progress file after each step and the agent reads them ~40 times a
second; the control file is rewritten on every clearance. Under ``--log-dir``, which defaults to
the working directory (a shared filesystem on clusters: NFS, Lustre), that is hundreds of
thousands of metadata operations a second at 1,000 nodes (issue 25). They live instead in a
private directory on this host: ``$XDG_RUNTIME_DIR`` (per user, tmpfs), else ``/dev/shm``, else
the system's temporary directory. Logs, error files and checkpoints stay under ``--log-dir``.

An agent removes its directory when it exits; one killed (SIGKILL, OOM) cannot, and on tmpfs
every restart by a supervisor would leave one more behind. So each directory names its owner
(pid and start time, in ``owner``), and a new agent first removes those of this user whose
owner is gone.
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from agent.daemon.workers import procfs

OWNER = "owner"


def _usable(path: str | None) -> bool:
    """A directory we may create private entries in: ours (XDG's is 0700 and ours) or sticky
    (/dev/shm, /tmp), and writable."""
    if not path:
        return False
    try:
        info = os.stat(path)
    except OSError:
        return False
    ours = info.st_uid == os.getuid() and not info.st_mode & 0o022
    return stat.S_ISDIR(info.st_mode) and (ours or bool(info.st_mode & stat.S_ISVTX)) and os.access(path, os.W_OK)


def root(environ: Mapping[str, str]) -> str:
    for candidate in (environ.get("XDG_RUNTIME_DIR"), "/dev/shm"):
        if _usable(candidate):
            return str(candidate)
    return tempfile.gettempdir()


def _identity(pid: int) -> str | None:
    """``pid`` and its start time (a reused pid is another process), None once it is gone."""
    fields = procfs.stat_fields(pid)
    return None if fields is None or fields[0] == b"Z" else f"{pid} {int(fields[19])}"


def sweep(directory: str) -> list[Path]:
    """Remove this user's agent directories in ``directory`` whose owner process is gone; a
    directory without a readable owner record is left alone. Returns what it removed."""
    removed = []
    for entry in Path(directory).glob("elastic-agent-*"):
        try:
            if entry.is_symlink() or not entry.is_dir() or entry.stat().st_uid != os.getuid():
                continue
            owner = (entry / OWNER).read_text()
            pid = int(owner.split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if _identity(pid) != owner.strip():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def create(job_id: str, node_id: str, environ: Mapping[str, str]) -> Path:
    """A new directory of this agent's own (mode 0700, a fresh name: nothing another user
    placed there beforehand is ever used), once the ones of dead agents are gone."""
    where = root(environ)
    sweep(where)
    made = Path(tempfile.mkdtemp(prefix=f"elastic-agent-{job_id}-{node_id}-", dir=where))
    (made / OWNER).write_text(f"{_identity(os.getpid())}\n")
    return made


class NodeLocal:
    """One agent's private directory, made on first use, with a subdirectory per attempt."""

    def __init__(self, job_id: str, node_id: str, environ: Mapping[str, str]) -> None:
        self.job_id, self.node_id, self.environ = job_id, node_id, environ
        self.path: Path | None = None

    def attempt(self, name: str, nproc: int, running: object | None) -> tuple[Path, list[Path]]:
        """Attempt ``name``'s control file and its ranks' progress files, in a new subdirectory;
        the others go but the one of the attempt still ``running`` (a Running, or None)."""
        if self.path is None:
            self.path = create(self.job_id, self.node_id, self.environ)
            atexit.register(self.close)  # the agent leaves: its node-local files go
        keep = running.control_file.parent.name if running is not None else ""  # type: ignore[attr-defined]
        for entry in self.path.iterdir():
            if entry.name not in (keep, OWNER):
                shutil.rmtree(entry, ignore_errors=True)
        made = self.path / name
        made.mkdir(mode=0o700)
        return made / "control", [made / f"progress-{r}.json" for r in range(nproc)]

    def close(self) -> None:
        """The agent is leaving: its node-local files go."""
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        self.path = None
