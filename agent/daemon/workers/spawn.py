"""Starting one worker process: its own session, output pumped to sinks, and death with the
agent (its parent is the agent's keeper, agent.daemon.workers.keeper_main). The one place workers
are started."""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Sequence

from agent.daemon.workers.keeper import KeptProcess, shared_keeper
from agent.daemon.workers.output import Sink, pump
from agent.errors import SpawnError

LOCAL_RANK_MACRO = "${local_rank}"  # torchrun's macros.local_rank
LOCAL_RANK_ARG = f"--local-rank={LOCAL_RANK_MACRO}"  # what torch.distributed.launch passed
_PYTHON = re.compile(r"^python[0-9.]*$")
_PYTHON_OPTIONS_WITH_VALUE = {"-W", "-X", "--check-hash-based-pycs"}


def for_rank(command: Sequence[str], local_rank: int) -> list[str]:
    """The command one worker runs: ``${local_rank}`` in an argument becomes its local rank,
    as torchrun substitutes it (the program itself is left alone)."""
    return [command[0], *(arg.replace(LOCAL_RANK_MACRO, str(local_rank)) for arg in command[1:])]


def with_local_rank_arg(command: Sequence[str]) -> list[str]:
    """``--local-rank-arg``: ``--local-rank=${local_rank}`` right after the script, where
    torch.distributed.launch put it: after ``python [OPTIONS] SCRIPT`` or ``python -m MODULE``
    (or ``-c CODE``); for any other program, right after the program, as ``launch --no-python``."""
    at = 1
    if _PYTHON.match(os.path.basename(command[0])):
        i = 1
        while i < len(command):
            arg = command[i]
            if arg in ("-m", "-c"):
                i += 1
                break
            if arg in _PYTHON_OPTIONS_WITH_VALUE:
                i += 2
                continue
            if not arg.startswith("-") or arg == "-":
                break
            i += 1
        at = min(i + 1, len(command))
    return [*command[:at], LOCAL_RANK_ARG, *command[at:]]


def check_command(command: Sequence[str]) -> None:
    """Fail early, with one line, when the worker command cannot be executed."""
    name = command[0]
    found = name if os.sep in name else shutil.which(name)
    if not found or not os.access(found, os.X_OK) or os.path.isdir(found):
        raise SpawnError(f"worker command {name!r} not found or not executable")


def spawn(command: list[str], env: dict[str, str], *, stdin_pipe: bool = False,
          run: list[str] | None = None) -> tuple[KeptProcess, list[Sink], list[threading.Thread]]:
    """Start one worker in its own session under this agent's keeper; its stdout and stderr
    are pumped to two sinks. With ``stdin_pipe``, ``process.stdin`` is our end of its stdin.
    With ``run`` the worker is forked from the zygote and runs ``python RUN`` in process."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if stdin_pipe else (os.open(os.devnull, os.O_RDONLY), -1)
    try:
        process = shared_keeper().spawn(list(command), env, os.getcwd(), (in_r, out_w, err_w), run=run)
    except BaseException:
        for fd in (out_r, err_r, in_w):
            if fd >= 0:
                os.close(fd)
        raise
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
    if stdin_pipe:
        process.stdin = os.fdopen(in_w, "wb", buffering=0)
    sinks, readers = [], []
    for fd in (out_r, err_r):
        sink = Sink()
        reader = threading.Thread(target=pump, args=(os.fdopen(fd, "rb"), sink), daemon=True,
                                  name=f"worker-{process.pid}")
        reader.start()
        sinks.append(sink)
        readers.append(reader)
    return process, sinks, readers
