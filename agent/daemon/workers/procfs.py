"""Reading ``/proc``: one parser of ``/proc/<pid>/stat`` for everything that needs it."""

from __future__ import annotations

import os
from pathlib import Path


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (which may hold spaces and
    parentheses): ``[state, ppid, pgrp, session, ...]``; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()


def state(pid: int) -> str | None:
    """The process's state letter (``R``, ``S``, ``T`` stopped, ``Z`` zombie...), None if gone."""
    fields = stat_fields(pid)
    return fields[0].decode() if fields else None


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    return state(pid) not in (None, "Z")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process used so far (0 when it is gone)."""
    fields = stat_fields(pid)
    if not fields:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_alive(pgid: int) -> bool:
    """Whether any process other than a zombie is left in the process group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies (orphans not yet reaped by init, in containers without a reaping init) still
    # count for kill(); they hold no resources, so don't wait for them.
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
        if fields and len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the children of each of its threads, recursively)."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            frontier += kids
    return found
