"""A default node id that survives an agent restart on the same host.

The default ``--node-id`` is the host name plus a random suffix (DESIGN section 2). A new
suffix at every start made an agent restarted by systemd a new node: its in-memory snapshots
(keyed by node id, in ``/dev/shm``) were orphaned, gigabytes until the next reboot, and never
found again. So the suffix is kept per (host, job) in a node-local state file: shared memory
(``/dev/shm``, the snapshots' own lifetime: a reboot loses both) or else ``/var/tmp``, never the
working or log directory (often a shared filesystem). Two agents of one job on one host must
still get distinct ids: each holds an exclusive ``flock`` on its slot file while it runs, and a
second agent takes the next free slot. An explicit ``--node-id`` is used as given.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SLOTS = 64  # agents of one job on one host
_SUFFIX = re.compile(r"[0-9a-f]{6}")
_held: list[int] = []  # the slot files this process holds (their locks last as long as it)


def state_dir() -> Path:
    """Node-local, per user: where the kept suffixes live."""
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path("/var/tmp")
    return root / f"elastic-agent-{os.getuid()}" / "node-ids"


def kept_suffix(directory: Path, host: str, job: str, random_hex: Callable[[], str]) -> str | None:
    """This host's suffix for ``job``: the one a previous agent in the first free slot kept,
    or a new one kept there; None (a fresh random one is used) when no slot can be had."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if directory.stat().st_uid != os.getuid():
            log.warning("%s is not ours; the node id is not kept across restarts", directory)
            return None
    except OSError as exc:
        log.warning("cannot keep the node id in %s (%s); it is not kept across restarts", directory, exc)
        return None
    tag = hashlib.sha256(f"{host}\0{job}".encode()).hexdigest()[:16]
    for slot in range(SLOTS):
        path = directory / f"{tag}-{slot}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # another agent of this job on this host runs with it
            continue
        suffix = os.read(fd, 64).decode("ascii", "replace").strip()
        if not _SUFFIX.fullmatch(suffix):
            suffix = random_hex()
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, suffix.encode())
        _held.append(fd)
        return suffix
    return None
