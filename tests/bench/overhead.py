"""What a node costs beside its training workers: the proportional set size (PSS, from
``/proc/PID/smaps_rollup``) of every process the launcher keeps on the node that is not a
training worker, summed.

Processes are told apart by the process tree, never by command line (a worker forked by the
zygote shows the zygote's ``keeper_main.py FD --preload``): the node is the launcher's process
and everything below it; a training worker and everything below it (its own children, e.g.
data loaders) belong to training; all the rest (the agent, its keeper, the zygote when it runs,
torchrun's own process, and whatever else they start) is overhead. Which pids are the
workers, the launcher says: elastic-agent logs them ("workers (global ranks ...; pids ...)");
torchrun's workers are its direct children. PSS divides each shared page between the
processes that map it, so the pages a zygote shares with the workers it forked are charged
partly to them, and the sum over a node's processes is the node's real memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Overhead:
    pss_mib: float  # summed over every non-worker process of the node
    processes: tuple[tuple[int, str, float], ...]  # (pid, short command, PSS MiB) of each


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    found, frontier = [pid], [pid]
    while frontier:
        kids = children(frontier.pop())
        found += kids
        frontier += kids
    return found


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/{pid}/smaps_rollup has no Pss line")


def _name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [Path(a.decode(errors="replace")).name for a in argv[:3] if a]
    return " ".join(words)


def node_overhead(root: int, workers: list[int]) -> Overhead:
    """The overhead of the node whose launcher is ``root``, ``workers`` being its training
    workers. Raises ValueError when a named worker is not below ``root`` (a stale pid list)."""
    node = tree(root)
    missing = [w for w in workers if w not in node]
    if not workers or missing:
        raise ValueError(f"workers {workers} not all below pid {root} (missing {missing})")
    training = {p for w in workers for p in tree(w)}
    kept = []
    for pid in node:
        if pid in training:
            continue
        try:
            kept.append((pid, _name(pid), pss_mib(pid)))
        except (OSError, ValueError):
            continue  # exited between the listing and the read
    return Overhead(sum(p for _, _, p in kept), tuple(kept))
