"""What happened in a scenario, as the agents printed it and as the checkpoint directory and
/proc showed it while it ran. Only reads and records: the checks are in tests/chaos/invariants.py.

Times are ``time.monotonic()`` of when the runner read a line or saw a file, the same clock
as :class:`tests.e2e.harness.Line`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.harness import RESUME_RE, STEP_RE, AgentProc
from tests.waiting import alive

ROUND_RE = re.compile(r"\bround (\d+): (\d+) nodes, world size (\d+); this node is group rank (\d+)")
STARTED_RE = re.compile(r"started \d+ workers \(global ranks (\d+)-(\d+), pids ([\d, ]+)\)")
REFORM_RE = re.compile(r"workers re-form in process in round (\d+)")
MANIFEST_RE = re.compile(r"^step_(\d+)\.manifest\.json$")


@dataclass(frozen=True)
class Claim:
    """An agent said it runs ``round`` as group rank ``group_rank``."""

    t: float
    node: str
    round: int
    group_rank: int
    nodes: int


@dataclass(frozen=True)
class Step:
    t: float
    step: int
    world_size: int
    round: int  # the round its agent said it was in when the line came
    node: str


@dataclass(frozen=True)
class Resume:
    t: float
    step: int  # the first step this run trains: it loaded the checkpoint of step - 1
    round: int
    node: str


@dataclass
class Timeline:
    """Every agent's claims, steps and resumes, in time order."""

    claims: list[Claim]
    steps: list[Step]
    resumes: list[Resume]

    def steps_between(self, since: float, until: float) -> list[Step]:
        return [s for s in self.steps if since <= s.t <= until]

    def first_step(self, since: float, world_size: int | None = None) -> Step | None:
        return next((s for s in self.steps if s.t > since and world_size in (None, s.world_size)), None)

    def round_started(self) -> dict[int, float]:
        """When each round's first step was printed: from then on it is the round that trains."""
        started: dict[int, float] = {}
        for s in self.steps:
            started.setdefault(s.round, s.t)
        return started


def timeline(agents: list[AgentProc]) -> Timeline:
    claims, steps, resumes = [], [], []
    for agent in agents:
        # Worker lines belong to the round whose workers the agent started last: the old
        # round's workers may still print between the new round's line and their stop.
        claimed = current = 0
        for line in list(agent.lines):
            if m := ROUND_RE.search(line.text):
                claimed = int(m.group(1))
                claims.append(Claim(line.t, agent.node_id, claimed, int(m.group(4)), int(m.group(2))))
            elif STARTED_RE.search(line.text):
                current = claimed
            elif m := REFORM_RE.search(line.text):  # in-process workers: the same ones, a new round
                current = int(m.group(1))
            elif m := STEP_RE.search(line.text):
                steps.append(Step(line.t, int(m.group(1)), int(m.group(2)), current, agent.node_id))
            elif m := RESUME_RE.search(line.text):
                resumes.append(Resume(line.t, int(m.group(1)), current, agent.node_id))
    return Timeline(sorted(claims, key=lambda c: c.t), sorted(steps, key=lambda s: s.t),
                    sorted(resumes, key=lambda r: r.t))


def downtime(tl: Timeline, since: float, until: float) -> float:
    """The longest pause in training between ``since`` and ``until``: the largest gap between
    completed steps, counting from ``since`` to the first one (and from the last to ``until``
    when training never came back)."""
    times = [since, *(s.t for s in tl.steps_between(since, until))]
    gaps = [b - a for a, b in zip(times, times[1:])]
    if len(times) == 1 or until - times[-1] > max(gaps, default=0.0):
        gaps.append(until - times[-1])
    return max(gaps)


def lost_steps(tl: Timeline, since: float) -> int:
    """Completed steps trained again: for each resume after ``since``, how far below the
    highest step completed before it the run went back."""
    lost = 0
    for r in tl.resumes:
        if r.t < since:
            continue
        before = [s.step for s in tl.steps if s.t < r.t]
        if before:
            lost += max(0, max(before) - r.step + 1)
    return lost


def tracebacks(agent: AgentProc) -> list[str]:
    """The agent's own tracebacks (worker lines carry a ``[node/rank]`` prefix), each as its
    last line."""
    lines = [line.text for line in list(agent.lines)]
    found = []
    for i, text in enumerate(lines):
        if text.startswith("Traceback (most recent call last)"):
            tail = next((t for t in lines[i + 1:] if t and not t.startswith((" ", "\t"))), "?")
            found.append(f"{agent.node_id}: {tail[:160]}")
    return found


def worker_pids(agent: AgentProc, since: float = 0.0) -> list[int]:
    """Pids of every worker the agent said it started after ``since``."""
    pids = []
    for line in list(agent.lines):
        if line.t >= since and (m := STARTED_RE.search(line.text)):
            pids += [int(p) for p in m.group(3).replace(" ", "").split(",") if p]
    return pids


@dataclass(frozen=True)
class Seen:
    """A version of a checkpoint manifest: when it was written (its mtime, on the monotonic
    clock: polling alone would date it up to an interval late) and what it says."""

    written: float
    step: int
    round: int | None
    mtime_ns: int


class CheckpointWatcher:
    """Polls the checkpoint directory and records every manifest version that appears, so a
    resume can be matched with the checkpoint it loaded and who wrote it when."""

    def __init__(self, directory: Path, interval: float = 0.05) -> None:
        self.directory = directory
        self.interval = interval
        self.seen: list[Seen] = []
        self._known: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="checkpoint-watcher")

    def start(self) -> CheckpointWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.scan()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.scan()

    def scan(self) -> None:
        try:
            entries = list(self.directory.iterdir())
        except OSError:
            return
        offset = time.time() - time.monotonic()  # wall clock to monotonic, for mtimes
        for path in entries:
            m = MANIFEST_RE.match(path.name)
            if not m:
                continue
            try:
                mtime = path.stat().st_mtime_ns
                if self._known.get(path.name) == mtime:
                    continue
                document = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue  # replaced or deleted while we looked: the next scan sees the result
            self._known[path.name] = mtime
            round_number = document.get("round") if isinstance(document, dict) else None
            self.seen.append(Seen(mtime / 1e9 - offset, int(m.group(1)),
                                  round_number if isinstance(round_number, int) else None, mtime))

    def version_at(self, step: int, t: float) -> Seen | None:
        """The version of step ``step``'s manifest that was on disk at ``t`` (the last written before)."""
        versions = sorted((v for v in self.seen if v.step == step and v.written <= t), key=lambda v: v.mtime_ns)
        return versions[-1] if versions else None


class PidWatch:
    """Records when each watched pid is first seen gone (a zombie counts as gone)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.gone: dict[int, float] = {}
        self._watched: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="pid-watch")

    def start(self) -> PidWatch:
        self._thread.start()
        return self

    def watch(self, pids: list[int]) -> None:
        with self._lock:
            self._watched |= set(pids)

    def gone_at(self, pids: list[int]) -> float | None:
        """When the last of ``pids`` was seen gone; None while one is alive."""
        times = [self.gone.get(pid) for pid in pids]
        return None if any(t is None for t in times) else max(times, default=0.0)  # type: ignore[type-var]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                pending = [pid for pid in self._watched if pid not in self.gone]
            now = time.monotonic()
            for pid in pending:
                if not alive(pid):
                    self.gone[pid] = now
