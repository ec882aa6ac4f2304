"""One scenario's machinery: its cluster (tests/e2e/harness.py: an embedded etcd and real
agents on 127.0.0.1), its deadline, what the workers reported about where they run, and a
sampler of the processes that hold GPU memory (``nvidia-smi --query-compute-apps``).

Every wait has a deadline (the scenario's, capped by the run's budget) and gives up early
when an agent that should be running has exited; a stop request (SIGINT, SIGTERM) ends the
wait at once. Everything is stopped by pid through the harness.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tests.e2e.harness import PYTHON, AgentProc, Cluster, alive
from tests.gpu import expect
from tests.gpu.plan import ELRUN, Node, Result, Scenario
from tests.gpu.smi import Smi, normal_uuid

T = TypeVar("T")
WORKER = Path(__file__).with_name("worker.py")
MEMORY_MARGIN_MIB = 300  # a GPU is "back" when it holds at most this much more than before the run
SAMPLE_EVERY_S = 0.5
POLL_S = 0.05


class Failed(Exception):
    """An expectation of the scenario was not met; the message goes into the table."""


class Stopped(Exception):
    """SIGINT or SIGTERM: stop everything, print what was measured."""


@dataclass
class Context:
    smi: Smi
    dry_run: bool
    stop: threading.Event
    budget_end: float  # time.monotonic() by which every scenario must be over
    baseline: dict[str, int] = field(default_factory=dict)  # GPU uuid -> MiB used before the run
    say: Callable[[str], None] = print


def pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") and alive(pid)


class Sampler:
    """Which pids hold GPU memory, every half second, in a thread (nvidia-smi takes a while)."""

    def __init__(self, smi: Smi) -> None:
        self.smi = smi
        self.samples: list[tuple[float, frozenset[int]]] = []  # (time.monotonic(), pids)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="gpu-apps-sampler")
        self._enabled = smi.present
        if self._enabled:
            self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            began = time.monotonic()
            pids = frozenset(a.pid for a in self.smi.apps())
            self.samples.append((began, pids))
            self._done.wait(max(0.0, SAMPLE_EVERY_S - (time.monotonic() - began)))

    def close(self) -> None:
        self._done.set()
        if self._enabled:
            self._thread.join(timeout=30)

    def seen(self, pids: set[int], after: float = 0.0) -> set[int]:
        return {p for t, s in list(self.samples) if t >= after for p in s & pids}


class Scene:
    def __init__(self, spec: Scenario, ctx: Context, result: Result) -> None:
        self.spec, self.ctx, self.result = spec, ctx, result
        self.t0 = time.monotonic()
        self.deadline = min(self.t0 + spec.deadline_s, ctx.budget_end)
        self.cluster = Cluster(job_id=f"gpu-check-{spec.name}")
        self.reports_dir = self.cluster.workdir / "reports"
        self.agents: dict[str, AgentProc] = {}
        self.expect_running: set[str] = set()
        self.sampler: Sampler | None = None

    # --- starting and stopping ------------------------------------------------------------
    def __enter__(self) -> Scene:
        self.cluster.__enter__()
        try:
            self.reports_dir.mkdir()
        except BaseException:
            self.cluster.close()
            raise
        self.sampler = Sampler(self.ctx.smi) if not self.ctx.dry_run else None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sampler is not None:
            self.sampler.close()
        self.cluster.close()

    def env(self, node: Node) -> dict[str, str]:
        env = {"GPU_CHECK_BACKEND": self.spec.backend, "GPU_CHECK_REPORT_DIR": str(self.reports_dir)}
        if self.ctx.dry_run:
            env["GPU_CHECK_HIDE_CUDA"] = "1"
        else:
            env["NCCL_DEBUG"] = os.environ.get("NCCL_DEBUG", "WARN")  # NCCL's own reason shows on the console
        if node.cuda_visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = node.cuda_visible
        if self.spec.name == ELRUN:
            env["GPU_CHECK_HELPER_FORMS"] = "1"
        return env

    def start(self, node: Node, *, min_nodes: int, max_nodes: int, train: list[str]) -> AgentProc:
        command = [PYTHON, str(WORKER), *train]
        agent = self.cluster.start_agent(node.node_id, min_nodes=min_nodes, max_nodes=max_nodes,
                                         nproc=node.nproc, command=command, env=self.env(node))  # type: ignore[arg-type]
        self.agents[node.node_id] = agent
        self.expect_running.add(node.node_id)
        return agent

    # --- waiting ----------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def wait(self, predicate: Callable[[], T], what: str, cap: float | None = None, *, own: bool = False) -> T:
        """Until ``predicate`` is truthy: at most ``cap`` seconds, and (unless ``own``: the checks
        after the cluster is closed get their own ``cap``) not past the scenario's deadline."""
        now = time.monotonic()
        limit = now + (cap or 0.0) if own else (self.deadline if cap is None else min(self.deadline, now + cap))
        while True:
            if self.ctx.stop.is_set():
                raise Stopped()
            value = predicate()
            if value:
                return value
            for node_id in sorted(self.expect_running):
                code = self.agents[node_id].proc.poll()
                if code is not None:
                    raise Failed(f"{node_id}'s agent exited with code {code} while waiting for {what}")
            if time.monotonic() >= limit:
                raise Failed(f"no {what} within {limit - now:.0f}s")
            time.sleep(POLL_S)

    def pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.ctx.stop.is_set():
                raise Stopped()
            time.sleep(POLL_S)

    def say(self, text: str) -> None:
        self.ctx.say(f"[{time.monotonic() - self.t0:6.1f}s] {self.spec.name}: {text}")

    # --- what the workers reported ------------------------------------------------------------
    def reports(self) -> list[dict]:
        out = []
        for path in sorted(self.reports_dir.glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # being replaced: read on the next call
        return out

    def hooks(self) -> list[dict]:
        """What the in-process helper's pre-step hook saw (tests/gpu/worker.py)."""
        out = []
        for path in sorted(self.reports_dir.glob("*.hook")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return out

    def of(self, node_id: str, round_number: int | None = None) -> list[dict]:
        mine = [r for r in self.reports() if r["node"] == node_id]
        if round_number is None and mine:
            round_number = min(r["round"] for r in mine)
        return [r for r in mine if r["round"] == round_number]

    def first_reports(self) -> list[dict]:
        """Each node's reports of its first round, once every expected worker wrote one."""
        out = []
        for node in self.spec.nodes:
            mine = self.of(node.node_id)
            if len(mine) < node.expected_nproc:
                return []
            out += mine
        return out

    def check_placement(self, reports: list[dict]) -> None:
        problem = expect.placement(self.spec, reports, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if problem:
            raise Failed(problem)
        if self.spec.device == "cuda" and self.ctx.smi.present:
            unknown = expect.strangers(reports, [g.uuid for g in self.ctx.smi.gpus()])
            if unknown:  # the other checks stand
                self.result.note(f"worker GPU UUIDs not among nvidia-smi's: {sorted(unknown)}")

    # --- GPU memory -----------------------------------------------------------------------------
    @property
    def memory_checked(self) -> bool:
        return not self.ctx.dry_run and self.ctx.smi.present

    def foreign(self, reports: list[dict]) -> dict[int, set[str]]:
        return expect.foreign(reports, self.ctx.smi.apps()) if self.memory_checked else {}

    def gpus_of(self, reports: list[dict]) -> set[str]:
        return {u for u in (normal_uuid(r["uuid"]) for r in reports) if u}

    def gpus_of_node(self, node_id: str) -> set[str]:
        """A node's own GPUs: its CUDA_VISIBLE_DEVICES when given as UUIDs, else where its workers ran."""
        node = next(n for n in self.spec.nodes if n.node_id == node_id)
        given = {normal_uuid(e) for e in (node.cuda_visible or "").split(",") if e.strip().lower().startswith("gpu-")}
        return {u for u in given if u} or self.gpus_of(self.of(node_id))

    def every_gpu(self) -> set[str]:
        return {u for u in (normal_uuid(g.uuid) for g in self.ctx.smi.gpus()) if u} if self.memory_checked else set()

    def holding(self, pids: set[int]) -> set[int]:
        """Which of these pids hold GPU memory now."""
        if not self.memory_checked:
            return set()
        return {a.pid for a in self.ctx.smi.apps()} & pids

    def over_baseline(self, gpus: set[str]) -> dict[str, int]:
        """MiB above the run's baseline on these GPUs, where more than the margin."""
        if not self.memory_checked:
            return {}
        now = {normal_uuid(g.uuid): g.used_mib for g in self.ctx.smi.gpus()}
        return expect.over_baseline(now, self.ctx.baseline, gpus, MEMORY_MARGIN_MIB)  # type: ignore[arg-type]

    def apps_visible(self, pids: set[int]) -> bool | None:
        """Whether compute-apps ever listed one of our workers (None: nothing sampled)."""
        if self.sampler is None or not self.sampler.samples:
            return None
        return bool(self.sampler.seen(pids))

    def released(self, pids: set[int], gpus: set[str], what: str, cap: float = 20.0, own: bool = False) -> None:
        """These pids are gone and hold no GPU memory, and these GPUs are back to the baseline."""
        self.wait(lambda: not any(pid_alive(p) for p in pids), f"{what}: processes gone", cap=cap, own=own)
        self.wait(lambda: not self.holding(pids), f"{what}: no pid of theirs in compute-apps", cap=cap, own=own)
        try:
            self.wait(lambda: not self.over_baseline(gpus), f"{what}: GPU memory back to the baseline", cap=cap,
                      own=own)
        except Failed:
            over = self.over_baseline(gpus)
            raise Failed(f"{what}: GPU memory not released ({', '.join(f'{u[:8]} +{m} MiB' for u, m in over.items())})"
                         ) from None
