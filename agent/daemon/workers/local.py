"""This node's workers across rounds: start a round's group, drain or stop it, and keep the
next round's workers pre-started. Acts only; the loop decides when.

Stopping never holds up the rendezvous: the loop asks for a stop (SIGTERM now, or a drain
to the next step boundary), joins the next round at once, and advances the stop on every
tick (SIGKILL after --shutdown-timeout, or --abort-timeout after an unplanned loss). So a node
whose workers take seconds to stop is not left out of the round that follows, and its restart
is the same restart as everyone's.

Logs: ``<log-dir>/<job-id>/<node-id>/<UTC start>-round<N>/<local rank>/``, one directory per
attempt that no other node and no later attempt touches; the oldest beyond ``log_keep``
attempts of this node are deleted.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.daemon import policy
from agent.daemon.config.console import ConsoleSettings, Route
from agent.daemon.workers import runtime_dir
from agent.daemon.workers.env import worker_env
from agent.daemon.workers.group import WorkerGroup, error_file_path
from agent.daemon.workers.prewarm import WarmPool, WarmWorker
from agent.daemon.workers.spawn import with_local_rank_arg
from agent.errors import AgentError
from agent.worker import control as worker_control
from agent.worker import snapshot_wire
from rendezvous.clock import Clock
from rendezvous.state import Assignment

log = logging.getLogger("elastic_agent")
_ATTEMPT = re.compile(r"^\d{8}T\d{6}\.\d{3}Z-round\d+(-\d+)?$")


class Group(Protocol):
    """What the agent needs of a worker group (agent.daemon.workers.group.WorkerGroup, or a fake)."""

    pids: list[int]

    def start(self) -> None: ...

    def poll(self) -> list[int | None]: ...

    def stop(self, timeout: float) -> None: ...

    def terminate(self) -> None: ...

    def settled(self) -> bool: ...

    def kill(self) -> None: ...

    def relabel(self, routes: Sequence[Route]) -> None: ...

    def failure_summary(self, local_rank: int) -> str: ...

    def stderr_tail(self, local_rank: int, lines: int = 10) -> list[str]: ...


# (command, envs, log dir, console routes, pre-started workers) -> a group, not yet started.
GroupFactory = Callable[[Sequence[str], list[dict[str, str]], Path, list[Route], list[WarmWorker]], Group]


def process_group(command: Sequence[str], envs: list[dict[str, str]], log_dir: Path, routes: list[Route],
                  warm: list[WarmWorker]) -> Group:
    return WorkerGroup(command, envs, log_dir, routes, warm=warm)


def snapshots_of(job_id: str, log_dir: Path) -> Path:
    """Where a job's in-memory snapshots live on this host: shared memory where the host has
    it (they outlive the workers and cost no disk), else under the log directory."""
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else log_dir
    return root / "elastic-agent-snapshots" / job_id


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
    log_keep: int = 100  # attempts of this node whose logs are kept
    console: ConsoleSettings = ConsoleSettings()  # what of the workers' output the console shows
    local_rank_arg: bool = False  # pass --local-rank=N, as torch.distributed.launch did
    # SIGTERM to SIGKILL after an unplanned loss: ranks blocked in a broken collective cannot run
    # a SIGTERM handler, so waiting --shutdown-timeout for them only delays the survivors.
    abort_timeout: float = 2.0
    # The job's snapshot key (agent.worker.snapshot_wire), from etcd; None: workers neither
    # send snapshots to a peer nor serve any.
    snapshot_key: Callable[[], bytes | None] = lambda: None

    @property
    def abort_grace(self) -> float:
        """SIGTERM to SIGKILL after an unplanned loss: never longer than a planned stop's."""
        return min(self.abort_timeout, self.shutdown_timeout)

    @property
    def snapshot_dir(self) -> Path:
        """This node's in-memory snapshots (agent.worker.snapshot)."""
        return snapshots_of(self.job_id, self.log_dir) / self.node_id

    def forget_snapshots(self) -> None:
        """This node is done with the job (or starts it afresh): its snapshots (RAM) go."""
        shutil.rmtree(self.snapshot_dir, ignore_errors=True)
        try:
            self.snapshot_dir.parent.rmdir()  # the job's, once every node on this host is done
        except OSError:
            pass

    def prepare_snapshots(self, assignment: Assignment) -> None:
        """Before a round's workers start: an earlier job's snapshots (the job's first round)
        and orphans go, and the job's key is in the workers' directory."""
        if assignment.round <= 1:
            self.forget_snapshots()
        self.forget_gone(assignment)
        key = self.snapshot_key()
        if key is not None:
            try:
                snapshot_wire.write_key(self.snapshot_dir, key)
            except OSError as exc:
                log.warning("cannot write the snapshot key into %s (%s); snapshots stay on this node",
                            self.snapshot_dir, exc)

    def forget_gone(self, assignment: Assignment) -> None:
        gone = self.forget_snapshots_of_others([*assignment.node_ids, *assignment.standbys])
        if gone:
            log.info("removed the in-memory snapshots of node ids no longer in the job: %s", ", ".join(gone))

    def forget_snapshots_of_others(self, members: Collection[str]) -> list[str]:
        """The snapshot directories on this host of node ids that are no members of the round
        (an agent restarted under another id, a node gone from the job) go: nobody would ever
        read them, and they hold RAM until the next reboot. Returns the ids whose went."""
        gone = []
        try:
            siblings = [p for p in self.snapshot_dir.parent.iterdir() if p.is_dir()]
        except OSError:
            return gone
        for path in siblings:
            if path.name != self.node_id and path.name not in members and not path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True)
                gone.append(path.name)
        return gone


@dataclass
class Running:
    """The local worker group of one round."""

    assignment: Assignment
    group: Group
    attempt_dir: Path
    progress_files: list[Path]
    control_file: Path
    started_at: float  # monotonic
    draining_since: float | None = None  # asked to checkpoint and stop at a step boundary
    drain_budget: float = 0.0
    terminated_at: float | None = None  # SIGTERM sent; SIGKILL after kill_after seconds
    kill_after: float = 0.0  # --shutdown-timeout for a planned stop, --abort-timeout otherwise
    # The last step the workers may start (the control file's clear_to): helper users start
    # none past their first until the agent clears more (agent.daemon.planning says why).
    cleared: int = -1

    @property
    def stopping(self) -> bool:
        return self.draining_since is not None or self.terminated_at is not None


class LocalWorkers:
    def __init__(self, layout: Layout, environ: Mapping[str, str], clock: Clock, *,
                 factory: GroupFactory = process_group, prewarm: bool = False,
                 on_stopped: Callable[[], None] = lambda: None) -> None:
        self.layout = layout
        self.on_stopped = on_stopped
        self.environ = dict(environ)
        self.clock = clock
        self.factory = factory
        self.running: Running | None = None
        self.attempt = 0
        # Once a round's workers reported through the helper, later rounds run the same script:
        # a leave right after a restart, before any report, still drains rather than loses steps.
        self.helper_seen = False
        self.pool = WarmPool(layout.command[0], self.environ, layout.nproc, enabled=prewarm)
        self.local_files = runtime_dir.NodeLocal(layout.job_id, layout.node_id, self.environ)  # control, progress

    def start(self, assignment: Assignment) -> Running:
        lay = self.layout
        node = lay.node_id
        attempt_dir = self._new_attempt_dir(assignment.round)
        self.attempt += 1
        lay.prepare_snapshots(assignment)
        group_rank = assignment.group_rank(node)
        assert group_rank is not None
        offset = assignment.rank_offset(node)
        control, progress = self.local_files.attempt(attempt_dir.name, lay.nproc, self.running)  # not on --log-dir
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
                progress_file=str(progress[local_rank]), control_file=str(control),
                snapshot_dir=str(lay.snapshot_dir),
            )
            envs.append(env)
        routes = [lay.console.route(local_rank=r, rank=offset + r, node_id=node, role_name=envs[r]["ROLE_NAME"])
                  for r in range(lay.nproc)]
        command = with_local_rank_arg(lay.command) if lay.local_rank_arg else lay.command
        warm = self.pool.take(lay.nproc)
        worker_control.write(control, worker_control.Control(clear_to=-1))  # see Running.cleared
        group = self.factory(command, envs, attempt_dir, routes, warm)
        group.start()
        self.running = Running(assignment, group, attempt_dir, progress, control, self.clock.monotonic())
        log.info("started %d workers (global ranks %d-%d, pids %s), logs in %s", lay.nproc, offset,
                 offset + lay.nproc - 1, ",".join(map(str, group.pids)), attempt_dir)
        return self.running

    def running_pgids(self) -> list[int]:
        run = self.running
        return list(run.group.pids) if run is not None else []

    def reformed(self, assignment: Assignment) -> None:
        """The running workers re-formed in process into ``assignment``'s round."""
        run = self.running
        assert run is not None
        self.attempt += 1
        run.assignment = assignment
        self.layout.forget_gone(assignment)
        run.started_at = self.clock.monotonic()
        offset = assignment.rank_offset(self.layout.node_id)
        run.group.relabel([self.layout.console.route(local_rank=r, rank=offset + r, node_id=self.layout.node_id)
                     for r in range(self.layout.nproc)])
        log.info("workers re-form in process in round %d (global ranks %d-%d of %d)", assignment.round, offset,
                 offset + self.layout.nproc - 1, assignment.world_size)

    def _new_attempt_dir(self, round_number: int) -> Path:
        """A directory of this node's own that no earlier attempt (of this or an earlier agent
        run) used; names sort by start time."""
        node_dir = self.layout.log_dir / self.layout.job_id / self.layout.node_id
        now = time.time()
        base = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z-round{round_number}"
        for n in range(1000):
            path = node_dir / (base if n == 0 else f"{base}-{n}")
            try:
                path.mkdir(parents=True)
            except FileExistsError:
                continue
            _prune(node_dir, path, self.layout.log_keep)
            return path
        raise AgentError(f"cannot create a new attempt directory under {node_dir}")

    # The pre-started pool is the loop's to steer (agent.daemon.workers.prewarm.WarmPool).
    def fill_warm(self) -> None:
        self.pool.fill()

    def warm_ready(self) -> bool:
        return self.pool.ready()

    def retire_warm(self) -> None:
        self.pool.retire()

    def discard_warm(self) -> None:
        self.pool.discard()

    # --- stopping ------------------------------------------------------------------------
    def begin_stop(self, why: str, *, drain: bool, budget: float, planned: bool = True) -> None:
        """Start stopping the workers without waiting. With ``drain`` (the workers were told
        a step to stop after, agent.daemon.steering), helper users get ``budget`` seconds to
        reach it, checkpoint and exit; otherwise (or without the helper) they get SIGTERM now.
        SIGKILL follows --shutdown-timeout later for a ``planned`` stop, --abort-timeout after
        an unplanned loss. :meth:`advance_stop` takes it from there."""
        run = self.running
        if run is None or run.stopping:
            return
        run.kill_after = self.layout.shutdown_timeout if planned else self.layout.abort_grace
        if drain and self.uses_helper(run) and any(c is None for c in run.group.poll()):
            log.info("letting workers reach their stop step, checkpoint and exit within %.0fs (%s)", budget, why)
            run.draining_since = self.clock.monotonic()
            run.drain_budget = budget
            return
        self._terminate(run, why)

    def uses_helper(self, run: Running) -> bool:
        """Whether this node's workers report through the helper (remembered across rounds: a
        leave right after a restart, before any report, still drains)."""
        self.helper_seen = self.helper_seen or policy.helper_in_use(run.progress_files)
        return self.helper_seen

    def _terminate(self, run: Running, why: str) -> None:
        log.info("stopping local workers (%s)", why)
        run.group.terminate()
        run.terminated_at = self.clock.monotonic()
        self.advance_stop()

    def advance_stop(self, *, insist: bool = False) -> None:
        """Move a stop in progress on, never blocking for long: a drain ends when every worker
        exited, its budget ran out, or on ``insist``; then SIGTERM; then SIGKILL once
        the stop's grace (:meth:`begin_stop`) has passed."""
        run = self.running
        if run is None or not run.stopping:
            return
        now = self.clock.monotonic()
        if run.terminated_at is None:
            assert run.draining_since is not None
            over = now - run.draining_since >= run.drain_budget
            if not (all(c is not None for c in run.group.poll()) or over or insist):
                return
            if over:
                log.warning("workers did not drain within %.0fs; stopping them", run.drain_budget)
            self._terminate(run, "drained")
            return
        if run.group.settled():
            self._stopped(run, "they exited")
        elif insist or now - run.terminated_at >= run.kill_after:
            run.group.kill()
            self._stopped(run, f"SIGKILL after {now - run.terminated_at:.1f}s")

    def finish_stopping(self, insist: Callable[[], bool] = lambda: False) -> None:
        """Block until a stop in progress is over (bounded by the drain budget and
        --shutdown-timeout)."""
        while self.running is not None and self.running.stopping:
            self.advance_stop(insist=insist())
            if self.running is not None:
                self.clock.sleep(0.02)

    def stop(self, why: str, *, planned: bool = True) -> bool:
        """Stop now: SIGTERM, SIGKILL after --shutdown-timeout (--abort-timeout when not
        ``planned``). Returns whether anything ran."""
        run = self.running
        if run is None:
            return False
        began = self.clock.monotonic()
        run.group.stop(self.layout.shutdown_timeout if planned else self.layout.abort_grace)
        self._stopped(run, f"{why}, in {self.clock.monotonic() - began:.2f}s")
        return True

    def _stopped(self, run: Running, how: str) -> None:
        self.running = None
        self.on_stopped()
        log.info("stopped local workers of round %d (%s)", run.assignment.round, how)


def _prune(node_dir: Path, keep: Path, log_keep: int) -> None:
    """Delete this node's oldest attempt directories beyond ``log_keep`` (``keep`` included)."""
    attempts = sorted(p for p in node_dir.iterdir() if _ATTEMPT.match(p.name) and p != keep)
    for old in attempts[: max(0, len(attempts) + 1 - log_keep)]:
        shutil.rmtree(old, ignore_errors=True)
