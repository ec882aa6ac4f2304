"""This node's workers across rounds: start a round's group, drain or stop it, and keep the
next round's workers pre-started. Acts only; the loop decides when."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.daemon import policy
from agent.daemon.env import worker_env
from agent.daemon.prewarm import WarmWorker
from agent.daemon.workers import WorkerGroup, error_file_path
from agent.errors import AgentError
from agent.worker.protocol import CONTROL_FILE_ENV, DRAIN
from rendezvous.clock import Clock
from rendezvous.state import Assignment

log = logging.getLogger("elastic_agent")


class Group(Protocol):
    """What the agent needs of a worker group (agent.daemon.workers.WorkerGroup, or a fake)."""

    pids: list[int]

    def start(self) -> None: ...

    def poll(self) -> list[int | None]: ...

    def stop(self, timeout: float) -> None: ...

    def failure_summary(self, local_rank: int) -> str: ...

    def stderr_tail(self, local_rank: int, lines: int = 10) -> list[str]: ...


# (command, envs, log dir, console prefixes, pre-started workers) -> a group, not yet started.
GroupFactory = Callable[[Sequence[str], list[dict[str, str]], Path, list[str], list[WarmWorker]], Group]


def process_group(command: Sequence[str], envs: list[dict[str, str]], log_dir: Path, prefixes: list[str],
                  warm: list[WarmWorker]) -> Group:
    return WorkerGroup(command, envs, log_dir, prefixes, warm=warm)


@dataclass(frozen=True)
class Layout:
    """What every round's workers share: the command and where things go."""

    command: tuple[str, ...]
    nproc: int
    node_id: str
    job_id: str
    log_dir: Path
    checkpoint_dir: Path | None
    max_restarts: int
    shutdown_timeout: float


@dataclass
class Running:
    """The local worker group of one round."""

    assignment: Assignment
    group: Group
    attempt_dir: Path
    progress_files: list[Path]
    control_file: Path
    started_at: float  # monotonic
    started_wall: float
    draining_since: float | None = None
    drain_budget: float = 0.0


class LocalWorkers:
    def __init__(self, layout: Layout, environ: Mapping[str, str], clock: Clock, *,
                 factory: GroupFactory = process_group, prewarm: bool = False,
                 on_stopped: Callable[[], None] = lambda: None) -> None:
        self.layout = layout
        self.on_stopped = on_stopped
        self.environ = dict(environ)
        self.clock = clock
        self.factory = factory
        self.prewarm = prewarm
        self.running: Running | None = None
        self.attempt = 0
        self.warm: list[WarmWorker] = []

    def start(self, assignment: Assignment) -> Running:
        lay = self.layout
        node = lay.node_id
        attempt_dir = lay.log_dir / lay.job_id / f"attempt_{self.attempt}"
        self.attempt += 1
        if attempt_dir.exists():
            shutil.rmtree(attempt_dir, ignore_errors=True)
        attempt_dir.mkdir(parents=True, exist_ok=True)
        group_rank = assignment.group_rank(node)
        assert group_rank is not None
        offset = assignment.rank_offset(node)
        control = attempt_dir / "control"
        progress = [attempt_dir / str(r) / "progress.json" for r in range(lay.nproc)]
        envs = []
        for local_rank in range(lay.nproc):
            env = worker_env(
                self.environ, local_rank=local_rank, local_world_size=lay.nproc,
                group_rank=group_rank, group_world_size=len(assignment.members),
                rank_offset=offset, world_size=assignment.world_size,
                master_addr=assignment.master_addr, master_port=assignment.master_port,
                restart_count=self.attempt - 1, max_restarts=lay.max_restarts, run_id=lay.job_id,
                error_file=str(error_file_path(attempt_dir, local_rank)), node_id=node,
                round_number=assignment.round,
                checkpoint_dir=str(lay.checkpoint_dir) if lay.checkpoint_dir else None,
                progress_file=str(progress[local_rank]),
            )
            env[CONTROL_FILE_ENV] = str(control)
            envs.append(env)
        prefixes = [f"{node}/{offset + r}" for r in range(lay.nproc)]
        warm, self.warm = self.warm[: lay.nproc], self.warm[lay.nproc:]
        group = self.factory(lay.command, envs, attempt_dir, prefixes, warm)
        group.start()
        self.running = Running(assignment, group, attempt_dir, progress, control, self.clock.monotonic(),
                               time.time())
        log.info("started %d workers (global ranks %d-%d, pids %s), logs in %s", lay.nproc, offset,
                 offset + lay.nproc - 1, ",".join(map(str, group.pids)), attempt_dir)
        return self.running

    def fill_warm(self) -> None:
        """Keep one pre-started worker per local rank ready for the next round."""
        if not self.prewarm:
            return
        self.warm = [w for w in self.warm if w.alive()]
        env = {**self.environ, "OMP_NUM_THREADS": self.environ.get("OMP_NUM_THREADS", "1")}
        while len(self.warm) < self.layout.nproc:
            try:
                self.warm.append(WarmWorker(self.layout.command[0], env))
            except AgentError as exc:
                log.warning("cannot pre-start workers (%s); starting them cold", exc)
                self.prewarm = False
                return

    def discard_warm(self) -> None:
        for warm in self.warm:
            warm.discard()
        self.warm.clear()

    # --- stopping ------------------------------------------------------------------------
    def begin_stop(self, why: str, *, drain: bool, budget: float) -> bool:
        """Stop the workers: with ``drain``, ask them (helper users) to checkpoint at the next
        step and stop within ``budget`` seconds, and return True while they do; otherwise
        stop them now. Returns whether a drain is under way."""
        run = self.running
        if run is None or run.draining_since is not None:
            return run is not None
        if drain and policy.helper_in_use(run.progress_files) and any(c is None for c in run.group.poll()):
            log.info("asking workers to checkpoint and stop at the next step within %.0fs (%s)", budget, why)
            tmp = run.control_file.with_suffix(".tmp")
            tmp.write_text(DRAIN)
            os.replace(tmp, run.control_file)  # workers never see a half-written request
            run.draining_since = self.clock.monotonic()
            run.drain_budget = budget
            return True
        self.stop(why)
        return False

    def advance_stop(self, *, insist: bool = False) -> None:
        """A drain in progress ends when every worker exited, its budget ran out, or on ``insist``."""
        run = self.running
        if run is None or run.draining_since is None:
            return
        over = self.clock.monotonic() - run.draining_since >= run.drain_budget
        if all(c is not None for c in run.group.poll()) or over or insist:
            if over:
                log.warning("workers did not drain within %.0fs; stopping them", run.drain_budget)
            self.stop("drained")

    def finish_stopping(self, insist: Callable[[], bool] = lambda: False) -> None:
        """Block until a drain in progress is over (bounded by its budget)."""
        while self.running is not None and self.running.draining_since is not None:
            self.advance_stop(insist=insist())
            if self.running is not None:
                self.clock.sleep(0.05)

    def stop(self, why: str) -> bool:
        """SIGTERM, then SIGKILL after --shutdown-timeout. Returns whether anything was running."""
        run = self.running
        if run is None:
            return False
        began = self.clock.monotonic()
        run.group.stop(self.layout.shutdown_timeout)
        self.running = None
        self.on_stopped()
        log.info("stopped local workers (%s) in %.2fs", why, self.clock.monotonic() - began)
        return True
