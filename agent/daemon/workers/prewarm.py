"""Pre-started ("warm") workers (``--prewarm``): the node's zygote imports torch while the
agent still waits in the rendezvous, and each worker is forked from it. :class:`WorkerGroup`
adopts them."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence

from agent.daemon.workers.keeper import KeptProcess, shared_keeper, use_zygote
from agent.daemon.workers.output import Sink
from agent.daemon.workers.spawn import spawn

_PYTHON_NAME = re.compile(r"^python[0-9.]*$")


def prewarmable(command: Sequence[str]) -> bool:
    """Only ``python SCRIPT.py ...`` and ``python -m MODULE ...`` can be started early."""
    if len(command) < 2 or not _PYTHON_NAME.match(os.path.basename(command[0])):
        return False
    return command[1].endswith(".py") or (command[1] == "-m" and len(command) >= 3)


class WarmWorker:
    """A worker forked from the node's zygote when it is given its round (:class:`WorkerGroup`
    adopts it). The zygote (agent.daemon.workers.keeper_main ``--preload``) imported torch once,
    while the first rendezvous ran, so a worker starts in milliseconds and shares torch's
    pages with every other worker of the node: one pre-started interpreter per node, not one
    per local rank."""

    def __init__(self, python: str, env: dict[str, str]) -> None:
        use_zygote(python, env)
        self.python = python
        self.process: KeptProcess | None = None
        self.sinks: list[Sink] = []
        self.readers: list[threading.Thread] = []

    def alive(self) -> bool:
        return shared_keeper().alive

    def launch(self, env: dict[str, str], argv: list[str]) -> None:
        """Fork the worker: it runs ``python ARGV`` with ``env`` (started plainly when this
        agent's keeper is not a zygote after all: one started before ``--prewarm`` applied)."""
        if shared_keeper().zygote is None:
            self.process, self.sinks, self.readers = spawn([self.python, *argv], env)
        else:
            self.process, self.sinks, self.readers = spawn([self.python], env, run=list(argv))

    def discard(self) -> None:
        """Nothing was started for it: nothing to stop."""
