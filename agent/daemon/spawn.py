"""Starting one worker process: its own session, output pumped to sinks, and death with the
agent. The one place that calls ``subprocess.Popen`` for workers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from agent.daemon.output import Sink, pump
from agent.errors import SpawnError

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


def with_pdeathsig(command: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-S", "-c", _PDEATHSIG_SHIM, str(os.getpid()), *command]


def check_command(command: Sequence[str]) -> None:
    """Fail early, with one line, when the worker command cannot be executed."""
    name = command[0]
    found = name if os.sep in name else shutil.which(name)
    if not found or not os.access(found, os.X_OK) or os.path.isdir(found):
        raise SpawnError(f"worker command {name!r} not found or not executable")


def spawn(command: list[str], env: dict[str, str], *,
           stdin: Any) -> tuple[subprocess.Popen[bytes], list[Sink], list[threading.Thread]]:
    try:
        process = subprocess.Popen(
            with_pdeathsig(command), env=env, stdin=stdin, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
        )
    except OSError as exc:
        raise SpawnError(f"cannot start worker command {command[0]!r}: {exc.strerror or exc}") from exc
    sinks, readers = [], []
    for pipe in (process.stdout, process.stderr):
        assert pipe is not None
        sink = Sink()
        reader = threading.Thread(target=pump, args=(pipe, sink), daemon=True, name=f"worker-{process.pid}")
        reader.start()
        sinks.append(sink)
        readers.append(reader)
    return process, sinks, readers


