"""What the GPU check runs on a given machine, and how it reports: pure functions of the
visible GPUs, so the unit tests cover every shape of machine without one.

Why the shapes: NCCL needs one GPU per rank (two ranks on one device are refused as a
duplicate GPU), so a job of several ranks runs NCCL only with a GPU per rank. On one GPU the
multi-node scenarios share it between two single-rank nodes and use gloo with CUDA tensors
(the model, the gradients and the all-reduces live on ``cuda:0``); NCCL there is the
single-node, single-rank job. With two or more GPUs the two nodes get disjoint halves
(``CUDA_VISIBLE_DEVICES`` per agent, as on two machines) and every group is NCCL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

NPROC_GPU, KILL, INPROCESS, DRAIN = "nproc-gpu", "kill-9", "inprocess-kill-9", "sigterm-drain"
ELRUN = "inprocess-elrun-kill-9"  # the same kill, the groups all formed by el.run
SCENARIOS = (NPROC_GPU, KILL, INPROCESS, ELRUN, DRAIN)
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
DRY_PRETEND = "0,1"  # the dry run's CUDA_VISIBLE_DEVICES for --nproc-per-node gpu: two pretend GPUs


@dataclass(frozen=True)
class Node:
    node_id: str
    cuda_visible: str | None  # the agent's CUDA_VISIBLE_DEVICES; None: inherited as it is
    nproc: str = "gpu"  # --nproc-per-node
    expected_nproc: int = 1


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: tuple[Node, ...]
    backend: str  # nccl | gloo
    device: str  # cuda | cpu
    gpus: int  # GPUs the scenario uses
    deadline_s: float
    why: str = ""  # a note on the shape, for the table

    @property
    def world_size(self) -> int:
        return sum(n.expected_nproc for n in self.nodes)

    @property
    def label(self) -> str:
        if self.device == "cpu":
            return f"{self.backend} (cpu)"
        return "nccl" if self.backend == "nccl" else f"{self.backend} (cuda tensors)"


@dataclass
class Result:
    scenario: str
    gpus: int
    backend: str
    outcome: str = FAIL
    recovery_s: float | None = None
    steps_lost: int | None = None
    notes: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)  # the agents' last console lines, when it failed

    def note(self, text: str) -> None:
        self.notes.append(text)

    def fail(self, why: str) -> None:
        self.outcome = FAIL
        self.notes.insert(0, why)


def split(entries: Sequence[str]) -> tuple[list[str], list[str]]:
    """Two nodes' GPUs: the first gets the larger half (3 GPUs: 2 and 1)."""
    half = (len(entries) + 1) // 2
    return list(entries[:half]), list(entries[half:])


def plan(visible: Sequence[str], dry_run: bool = False) -> list[Scenario]:
    """The scenarios for these visible GPUs (CUDA_VISIBLE_DEVICES entries or nvidia-smi UUIDs).
    ``dry_run``: the same scenarios with gloo on CPU (``visible`` is ignored)."""
    deadline = {NPROC_GPU: 120.0, KILL: 180.0, INPROCESS: 180.0, ELRUN: 180.0, DRAIN: 180.0}  # caps; ~20-60 s each is usual
    if dry_run:
        single = Node("node-0", DRY_PRETEND, "gpu", 2)
        pair = (Node("node-0", "0", "gpu", 1), Node("node-1", "0", "gpu", 1))
        why_single = f"CUDA_VISIBLE_DEVICES={DRY_PRETEND} pretends 2 GPUs; workers see none (cpu)"
        return [Scenario(NPROC_GPU, (single,), "gloo", "cpu", 0, deadline[NPROC_GPU], why_single)] + [
            Scenario(name, pair, "gloo", "cpu", 0, deadline[name], "2 nodes x 1 rank (CUDA_VISIBLE_DEVICES=0 "
                     "pretends a GPU each; workers see none)")
            for name in (KILL, INPROCESS, ELRUN, DRAIN)]
    count = len(visible)
    if count == 0:
        return []
    single = Node("node-0", None, "gpu", count)
    out = [Scenario(NPROC_GPU, (single,), "nccl", "cuda", count, deadline[NPROC_GPU],
                    f"1 node x {count} rank{'s' if count > 1 else ''}")]
    if count == 1:
        pair = (Node("node-0", None, "gpu", 1), Node("node-1", None, "gpu", 1))
        backend, why = "gloo", "2 nodes x 1 rank share 1 GPU: gloo (NCCL needs a GPU per rank)"
    else:
        first, second = split(visible)
        pair = (Node("node-0", ",".join(first), "gpu", len(first)),
                Node("node-1", ",".join(second), "gpu", len(second)))
        backend, why = "nccl", f"2 nodes x {len(first)}+{len(second)} GPUs (CUDA_VISIBLE_DEVICES split)"
    out += [Scenario(name, pair, backend, "cuda", count, deadline[name], why) for name in (KILL, INPROCESS, ELRUN, DRAIN)]
    return out


def steps_lost(steps: Sequence[tuple[float, int, int]], at: float, world_size: int
               ) -> tuple[int | None, int | None, int | None]:
    """From rank 0's ``(time, step, world size)`` lines: the first step trained at the new
    ``world_size`` after the event at ``at``, the last step completed before that one (a
    drain completes steps after the signal), and how many completed steps were trained again."""
    after = [(t, s) for t, s, w in steps if t > at and w == world_size]
    if not after:
        return None, None, None
    resumed_at, first = after[0]
    before = [s for t, s, _ in steps if t < resumed_at]
    if not before:
        return None, first, None
    completed = max(before)
    return completed, first, max(0, completed + 1 - first)


COLUMNS = ("scenario", "GPUs", "backend", "outcome", "recovery s", "steps lost", "notes")


def row(result: Result) -> tuple[str, ...]:
    return (result.scenario, str(result.gpus), result.backend, result.outcome,
            "-" if result.recovery_s is None else f"{result.recovery_s:.2f}",
            "-" if result.steps_lost is None else str(result.steps_lost),
            "; ".join(result.notes) or "-")


def table(results: Sequence[Result]) -> str:
    """A Markdown table, its columns padded so that it reads in a terminal too."""
    rows = [COLUMNS, *(row(r) for r in results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join([*(c.ljust(w) for c, w in zip(cells, widths)), cells[-1]]) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|---|"
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])
