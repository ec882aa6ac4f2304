"""Process control for one node's worker group: start, poll, stop, explain a failure.

Each worker runs in its own process group (its own session), so stopping a worker also stops
whatever it spawned (data loader processes, shell pipelines). Output goes to per-worker log
files and, line by line with a ``[prefix] `` tag, to the agent's console.

This module only acts; when to stop or restart is decided elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from agent.errors import SpawnError

_CONSOLE_LOCK = threading.Lock()  # several groups may share one console
_REAP_POLL_S = 0.01
_KILL_WAIT_S = 5.0  # after SIGKILL, how long to wait for the kernel to tear a group down
_READER_JOIN_S = 1.0  # how long to wait for a dead worker's output to drain
_TAIL_BYTES = 64 * 1024
_MAX_LINE = 64 * 1024


# Workers must die with the agent, even when it is killed with SIGKILL, so a dead agent never
# leaves workers holding GPUs: PR_SET_PDEATHSIG. Setting it in a preexec_fn would force
# fork() while gRPC threads run (gRPC's fork handlers can then abort the child), so a tiny
# exec shim sets it instead; it checks that the agent did not die before prctl took effect.
_PDEATHSIG_SHIM = (
    "import ctypes,os,sys\n"
    "ctypes.CDLL(None).prctl(1, 9)\n"
    "if os.getppid() != int(sys.argv[1]): os._exit(137)\n"
    "try:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as e:\n"
    "    print(f'cannot start worker command {sys.argv[2]!r}: {e.strerror}', file=sys.stderr)\n"
    "    os._exit(127)\n"
)


def _with_pdeathsig(command: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-S", "-c", _PDEATHSIG_SHIM, str(os.getpid()), *command]


def check_command(command: Sequence[str]) -> None:
    """Fail early, with one line, when the worker command cannot be executed."""
    name = command[0]
    found = name if os.sep in name else shutil.which(name)
    if not found or not os.access(found, os.X_OK) or os.path.isdir(found):
        raise SpawnError(f"worker command {name!r} not found or not executable")


def worker_log_dir(log_dir: Path, local_rank: int) -> Path:
    return Path(log_dir) / str(local_rank)


def error_file_path(log_dir: Path, local_rank: int) -> Path:
    """Where a worker's ``TORCHELASTIC_ERROR_FILE`` points (torch's ``@record`` writes it)."""
    return worker_log_dir(log_dir, local_rank) / "error.json"


def stdout_path(log_dir: Path, local_rank: int) -> Path:
    return worker_log_dir(log_dir, local_rank) / "stdout.log"


def stderr_path(log_dir: Path, local_rank: int) -> Path:
    return worker_log_dir(log_dir, local_rank) / "stderr.log"


def _group_alive(pgid: int) -> bool:
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
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces and parentheses).
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


class _Sink:
    """Where one output stream of a worker goes: buffered until the worker has a log file and
    a console prefix (a pre-started worker has neither yet), then appended and echoed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer: list[bytes] = []
        self._log: IO[bytes] | None = None
        self._prefix = ""
        self._console: IO[str] = sys.stdout

    def attach(self, path: Path, prefix: str, console: IO[str]) -> None:
        with self._lock:
            self._log = path.open("ab", buffering=0)
            self._prefix = prefix
            self._console = console
            for line in self._buffer:
                self._emit(line)
            self._buffer.clear()

    def write(self, line: bytes) -> None:
        with self._lock:
            if self._log is None:
                if len(self._buffer) < 1000:
                    self._buffer.append(line)
                return
            self._emit(line)

    def _emit(self, line: bytes) -> None:
        assert self._log is not None
        self._log.write(line)
        text = line.decode("utf-8", errors="replace")
        if not text.endswith("\n"):
            text += "\n"
        with _CONSOLE_LOCK:
            try:
                self._console.write(f"[{self._prefix}] {text}")
                self._console.flush()
            except (OSError, ValueError):
                pass  # a closed console must not stop the log file

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()


def _pump(pipe: IO[bytes], sink: _Sink) -> None:
    with pipe:
        for line in iter(lambda: pipe.readline(_MAX_LINE), b""):
            sink.write(line)
    sink.close()


def _spawn(command: list[str], env: dict[str, str], *,
           stdin: Any) -> tuple[subprocess.Popen[bytes], list[_Sink], list[threading.Thread]]:
    try:
        process = subprocess.Popen(
            _with_pdeathsig(command), env=env, stdin=stdin, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
        )
    except OSError as exc:
        raise SpawnError(f"cannot start worker command {command[0]!r}: {exc.strerror or exc}") from exc
    sinks, readers = [], []
    for pipe in (process.stdout, process.stderr):
        assert pipe is not None
        sink = _Sink()
        reader = threading.Thread(target=_pump, args=(pipe, sink), daemon=True, name=f"worker-{process.pid}")
        reader.start()
        sinks.append(sink)
        readers.append(reader)
    return process, sinks, readers


# A pre-started ("warm") worker: the interpreter starts and imports torch while the agent
# still waits in the rendezvous; it then reads one line (its environment and arguments) and
# runs the training script as `python SCRIPT ARGS` / `python -m MODULE ARGS` would.
_WARM_BOOT = """\
import json, os, runpy, sys
try:
    import torch  # the slow part of a worker's start, done before its rank is known
except Exception:
    pass
line = sys.stdin.readline()
if not line:
    os._exit(0)
msg = json.loads(line)
os.environ.clear()
os.environ.update(msg["env"])
os.chdir(msg["cwd"])
sys.stdin.close()
sys.stdin = open(os.devnull)
args = msg["argv"]
if args[0] == "-m":
    sys.argv = args[1:]
    sys.path[0] = os.getcwd()
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = args
    sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
    runpy.run_path(args[0], run_name="__main__")
"""
_PYTHON_NAME = re.compile(r"^python[0-9.]*$")


def prewarmable(command: Sequence[str]) -> bool:
    """Only ``python SCRIPT.py ...`` and ``python -m MODULE ...`` can be started early."""
    if len(command) < 2 or not _PYTHON_NAME.match(os.path.basename(command[0])):
        return False
    return command[1].endswith(".py") or (command[1] == "-m" and len(command) >= 3)


class WarmWorker:
    """A worker process started ahead of its round; :class:`WorkerGroup` adopts it."""

    def __init__(self, python: str, env: dict[str, str]) -> None:
        self.process, self.sinks, self.readers = _spawn([python, "-c", _WARM_BOOT], env, stdin=subprocess.PIPE)

    def alive(self) -> bool:
        return self.process.poll() is None

    def launch(self, env: dict[str, str], argv: list[str]) -> None:
        assert self.process.stdin is not None
        message = json.dumps({"env": env, "argv": argv, "cwd": os.getcwd()}) + "\n"
        self.process.stdin.write(message.encode())
        self.process.stdin.close()

    def discard(self) -> None:
        """Stop it unused (it holds no rank, so SIGKILL is fine)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(timeout=_KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
        for reader in self.readers:
            reader.join(_READER_JOIN_S)


class _Worker:
    """One worker process, its log files and output readers."""

    def __init__(self, local_rank: int, process: subprocess.Popen[bytes], prefix: str) -> None:
        self.local_rank = local_rank
        self.process = process
        self.prefix = prefix
        self.readers: list[threading.Thread] = []
        self.stderr_start = 0  # where this run's output starts in an appended stderr.log


class WorkerGroup:
    """The local workers of one round: one process (group) per environment in ``envs``."""

    def __init__(
        self,
        command: Sequence[str],
        envs: list[dict[str, str]],
        log_dir: Path,
        console_prefix: list[str],
        console: IO[str] | None = None,
        warm: list[WarmWorker] | None = None,
    ) -> None:
        if len(console_prefix) != len(envs):
            raise ValueError(f"{len(envs)} worker envs but {len(console_prefix)} console prefixes")
        if not command:
            raise ValueError("empty worker command")
        self.command = list(command)
        self.envs = envs
        self.log_dir = Path(log_dir)
        self.console_prefix = console_prefix
        self.console = console if console is not None else sys.stdout
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
        warm = self._take_warm()
        if warm is not None:
            warm.launch(env, self.command[1:])
            process, sinks, readers = warm.process, warm.sinks, warm.readers
        else:
            process, sinks, readers = _spawn(self.command, env, stdin=subprocess.DEVNULL)
        worker = _Worker(local_rank, process, self.console_prefix[local_rank])
        worker.stderr_start = stderr_start
        sinks[0].attach(stdout_path(self.log_dir, local_rank), worker.prefix, self.console)
        sinks[1].attach(err_log, worker.prefix, self.console)
        worker.readers.extend(readers)
        return worker

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
        # A group confirmed empty is never signalled again: its number may be reused one day.
        pending = [pid for pid in self.pids if pid not in self._gone]
        live = self._signal_groups(signal.SIGTERM, pending)
        live = self._wait_groups(live, time.monotonic() + timeout)
        if live:
            live = self._signal_groups(signal.SIGKILL, live)
            live = self._wait_groups(live, time.monotonic() + _KILL_WAIT_S)
        self._gone.update(pid for pid in pending if pid not in live)
        self.poll()
        # Output drains once every writer is gone; one shared deadline bounds the whole wait.
        deadline = time.monotonic() + _READER_JOIN_S
        for worker in self._workers:
            for reader in worker.readers:
                reader.join(max(0.0, deadline - time.monotonic()))

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
            live = [pgid for pgid in live if _group_alive(pgid)]
            if not live or time.monotonic() >= deadline:
                break
            time.sleep(_REAP_POLL_S)
        return live

    # ---- failure reports

    def stderr_tail(self, local_rank: int, lines: int = 10) -> list[str]:
        """The last ``lines`` non-empty lines this run wrote to the worker's stderr."""
        return [line for line in self._stderr_lines(local_rank) if line.strip()][-lines:]

    def _stderr_lines(self, local_rank: int) -> list[str]:
        worker = self._workers[local_rank]
        for reader in worker.readers:
            reader.join(_READER_JOIN_S)  # let a dead worker's last words reach the file
        path = stderr_path(self.log_dir, local_rank)
        try:
            with path.open("rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(worker.stderr_start, size - _TAIL_BYTES))
                data = handle.read()
        except OSError:
            return []
        return data.decode("utf-8", errors="replace").splitlines()

    def failure_summary(self, local_rank: int) -> str:
        """One line: which worker, how it ended, and the exception it raised when known."""
        worker = self._workers[local_rank]
        code = worker.process.poll()
        who = f"local rank {local_rank} (pid {worker.process.pid})"
        if code is None:
            return f"{who} is still running"
        how = _describe_exit(code)
        reason = _error_file_message(error_file_path(self.log_dir, local_rank))
        if reason is None:
            reason = _exception_line(self._stderr_lines(local_rank))
        return f"{who} {how}: {reason}" if reason else f"{who} {how}"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def _error_file_message(path: Path) -> str | None:
    """The exception line from a torchelastic error file, tolerating the shapes seen in the wild."""
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return None
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, dict):
        text = message.get("message")
        if not isinstance(text, str) or not text.strip():
            extra = message.get("extraInfo")
            callstack = extra.get("py_callstack") if isinstance(extra, dict) else None
            text = _exception_line(callstack.splitlines()) if isinstance(callstack, str) else None
    else:
        text = message
    if not isinstance(text, str) or not text.strip():
        return None
    # torch writes "<ExceptionType>: <message>"; a multi-line message is summed up by its first line.
    return text.strip().splitlines()[0].strip()


def _exception_line(lines: list[str]) -> str | None:
    """The last traceback's exception line (``ValueError: boom``), else the last non-empty line."""
    start = None
    for index, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            start = index
    if start is not None:
        for line in lines[start + 1 :]:
            if line.strip() and not line[0].isspace():
                return line.strip()
    non_empty = [line.strip() for line in lines if line.strip()]
    return non_empty[-1] if non_empty else None
