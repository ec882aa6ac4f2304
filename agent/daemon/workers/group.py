"""Process control for one node's worker group: start, poll, stop, explain a failure.

Each worker runs in its own process group (its own session), so stopping a worker also stops
whatever it spawned (data loader processes, shell pipelines). Output goes to per-worker log
files and, as each worker's :class:`~agent.daemon.config.console.Route` says, line by line after a
prefix to the agent's console: stdout to its stdout, stderr to its stderr, as torchrun does.
``${local_rank}`` in the command's arguments becomes each worker's local rank.

This module only acts; when to stop or restart is decided elsewhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from agent.daemon.config.console import Route
from agent.daemon.workers import procfs
from agent.daemon.workers.failures import describe_exit, error_file_message, exception_line
from agent.daemon.workers.keeper import KeptProcess
from agent.daemon.workers.output import Sink
from agent.daemon.workers.prewarm import WarmWorker
from agent.daemon.workers.spawn import check_command, for_rank, spawn

_REAP_POLL_S = 0.01
_KILL_WAIT_S = 5.0  # after SIGKILL, how long to wait for the kernel to tear a group down
_READER_JOIN_S = 1.0  # how long to wait for a dead worker's output to drain
_TAIL_BYTES = 64 * 1024


def worker_log_dir(log_dir: Path, local_rank: int) -> Path:
    return Path(log_dir) / str(local_rank)


def error_file_path(log_dir: Path, local_rank: int) -> Path:
    """Where a worker's ``TORCHELASTIC_ERROR_FILE`` points (torch's ``@record`` writes it)."""
    return worker_log_dir(log_dir, local_rank) / "error.json"


def stdout_path(log_dir: Path, local_rank: int) -> Path:
    return worker_log_dir(log_dir, local_rank) / "stdout.log"


def stderr_path(log_dir: Path, local_rank: int) -> Path:
    return worker_log_dir(log_dir, local_rank) / "stderr.log"


class _Worker:
    """One worker process, its log files and output readers, and how it ended: what a failure
    report reads (its error file, else the traceback at the end of its stderr)."""

    def __init__(self, local_rank: int, process: KeptProcess, route: Route) -> None:
        self.local_rank = local_rank
        self.process = process
        self.route = route
        self.readers: list[threading.Thread] = []
        self.sinks: list[Sink] = []
        self.stderr_start = 0  # where this run's output starts in an appended stderr.log

    def stderr_lines(self, log_dir: Path) -> list[str]:
        """What this run wrote to the worker's stderr (its last ``_TAIL_BYTES``)."""
        for reader in self.readers:
            reader.join(_READER_JOIN_S)  # let a dead worker's last words reach the file
        try:
            with stderr_path(log_dir, self.local_rank).open("rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(self.stderr_start, size - _TAIL_BYTES))
                data = handle.read()
        except OSError:
            return []
        return data.decode("utf-8", errors="replace").splitlines()

    def failure_summary(self, log_dir: Path) -> str:
        code = self.process.poll()
        who = f"local rank {self.local_rank} (pid {self.process.pid})"
        if code is None:
            return f"{who} is still running"
        how = describe_exit(code)
        reason = error_file_message(error_file_path(log_dir, self.local_rank))
        if reason is None:
            reason = exception_line(self.stderr_lines(log_dir))
        return f"{who} {how}: {reason}" if reason else f"{who} {how}"


class WorkerGroup:
    """The local workers of one round: one process (group) per environment in ``envs``.

    ``routes`` (one per worker; a plain label ``"node/3"`` means every line as ``[node/3] line``)
    say what reaches the console. ``console`` receives both streams when given (tests);
    otherwise stdout lines go to ``sys.stdout`` and stderr lines to ``err_console`` or ``sys.stderr``."""

    def __init__(
        self,
        command: Sequence[str],
        envs: list[dict[str, str]],
        log_dir: Path,
        routes: Sequence[Route | str],
        console: IO[str] | None = None,
        warm: list[WarmWorker] | None = None,
        err_console: IO[str] | None = None,
    ) -> None:
        if len(routes) != len(envs):
            raise ValueError(f"{len(envs)} worker envs but {len(routes)} console routes")
        if not command:
            raise ValueError("empty worker command")
        self.command = list(command)
        self.envs = envs
        self.log_dir = Path(log_dir)
        self.routes = [Route.labelled(r) if isinstance(r, str) else r for r in routes]
        self.console = console if console is not None else sys.stdout
        self.err_console = err_console or console or sys.stderr
        self._workers: list[_Worker] = []
        self._started = False
        self._gone: set[int] = set()  # process groups seen empty
        self._warm = list(warm or [])  # pre-started workers to adopt, in local-rank order

    # ---- lifecycle

    def start(self) -> None:
        """Launch every worker. On failure to launch one, stop those already started."""
        if self._started:
            raise RuntimeError("WorkerGroup.start() called twice")
        self._started = True
        check_command(self.command)
        try:
            for local_rank, env in enumerate(self.envs):
                self._workers.append(self._launch(local_rank, env))
        except BaseException:
            self.stop(timeout=1.0)
            raise
        finally:
            for unused in self._warm:
                unused.discard()
            self._warm.clear()

    def _launch(self, local_rank: int, env: dict[str, str]) -> _Worker:
        directory = worker_log_dir(self.log_dir, local_rank)
        directory.mkdir(parents=True, exist_ok=True)
        # A stale error file would be mistaken for this run's failure.
        error_file_path(self.log_dir, local_rank).unlink(missing_ok=True)
        err_log = stderr_path(self.log_dir, local_rank)
        stderr_start = err_log.stat().st_size if err_log.exists() else 0
        command = for_rank(self.command, local_rank)
        warm = self._take_warm()
        if warm is not None:
            warm.launch(env, command[1:])
            process, sinks, readers = warm.process, warm.sinks, warm.readers
        else:
            process, sinks, readers = spawn(command, env)
        route = self.routes[local_rank]
        worker = _Worker(local_rank, process, route)
        worker.stderr_start = stderr_start
        out_console = self.console if route.stdout else None
        sinks[0].attach(stdout_path(self.log_dir, local_rank), route.prefix, out_console)
        sinks[1].attach(err_log, route.prefix, self.err_console if route.stderr else None)
        worker.readers.extend(readers)
        worker.sinks = list(sinks)
        return worker

    def relabel(self, routes: Sequence[Route]) -> None:
        """The workers re-formed in process into another round: their console prefixes follow."""
        self.routes = list(routes)
        for worker in self._workers:
            worker.route = self.routes[worker.local_rank]
            for sink in worker.sinks:
                sink.relabel(worker.route.prefix)

    def _take_warm(self) -> WarmWorker | None:
        while self._warm:
            candidate = self._warm.pop(0)
            if candidate.alive():
                return candidate
            candidate.discard()
        return None

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    def poll(self) -> list[int | None]:
        """Each worker's exit code (negative: killed by that signal), or None while it runs."""
        return [worker.process.poll() for worker in self._workers]

    def stop(self, timeout: float) -> None:
        """SIGTERM every worker's process group, SIGKILL what is left after ``timeout`` seconds.

        Idempotent; returns once every group is gone or, after SIGKILL, a bounded wait ran out.
        """
        self.terminate()
        self._wait_groups(self._live(), time.monotonic() + timeout)
        self.kill()

    def terminate(self) -> None:
        """SIGTERM every worker's process group now, without waiting (see :meth:`settled`)."""
        self._signal_groups(signal.SIGTERM, self._live())

    def settled(self) -> bool:
        """Whether every worker's process group is empty and its exit known now. Never blocks."""
        return not self._live() and None not in self.poll()

    def kill(self) -> None:
        """SIGKILL what is left, wait (bounded) for the kernel to tear it down, drain output."""
        live = self._signal_groups(signal.SIGKILL, self._live())
        deadline = time.monotonic() + _KILL_WAIT_S
        self._wait_groups(live, deadline)
        # The keeper reaps the workers and reports their exits over its socket: a group can
        # be empty a moment before its leader's exit code reaches us.
        for worker in self._workers:
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass  # still unkillable (uninterruptible sleep); poll() says None
        # Output drains once every writer is gone; one shared deadline bounds the whole wait.
        deadline = time.monotonic() + _READER_JOIN_S
        for worker in self._workers:
            for reader in worker.readers:
                reader.join(max(0.0, deadline - time.monotonic()))

    def _live(self) -> list[int]:
        """Process groups not yet seen empty. A group confirmed empty is never signalled
        again: its number may be reused one day."""
        self.poll()
        live = [pid for pid in self.pids if pid not in self._gone and procfs.group_alive(pid)]
        self._gone.update(pid for pid in self.pids if pid not in live)
        return live

    def _signal_groups(self, sig: signal.Signals, pgids: list[int]) -> list[int]:
        live = []
        for pgid in pgids:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                continue
            except PermissionError:
                pass  # a member we may not signal; still wait on the group
            live.append(pgid)
        return live

    def _wait_groups(self, pgids: list[int], deadline: float) -> list[int]:
        """Wait until every group is empty or ``deadline``; return the groups still alive."""
        live = list(pgids)
        while live:
            self.poll()  # reap our direct children so they don't linger as zombies
            live = [pgid for pgid in live if procfs.group_alive(pgid)]
            if not live or time.monotonic() >= deadline:
                break
            time.sleep(_REAP_POLL_S)
        return live

    # ---- failure reports

    def stderr_tail(self, local_rank: int, lines: int = 10) -> list[str]:
        """The last ``lines`` non-empty lines this run wrote to the worker's stderr."""
        return [line for line in self._workers[local_rank].stderr_lines(self.log_dir) if line.strip()][-lines:]

    def failure_summary(self, local_rank: int) -> str:
        """One line: which worker, how it ended, and the exception it raised when known."""
        return self._workers[local_rank].failure_summary(self.log_dir)


