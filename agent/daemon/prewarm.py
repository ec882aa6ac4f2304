"""Pre-started ("warm") workers: the next workers' interpreters start and import torch while
the agent still waits in the rendezvous (``--prewarm``). :class:`WorkerGroup` adopts them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Sequence

from agent.daemon.spawn import spawn

_KILL_WAIT_S = 5.0
_READER_JOIN_S = 1.0

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
        self.process, self.sinks, self.readers = spawn([python, "-c", _WARM_BOOT], env, stdin_pipe=True)

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


