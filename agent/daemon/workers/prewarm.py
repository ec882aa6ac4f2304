"""Pre-started ("warm") workers (``--prewarm``): the node's zygote imports torch while the
agent still waits in the rendezvous, and each worker is forked from it. :class:`WorkerGroup`
adopts them. :class:`WarmPool` keeps one per local rank ready between rounds."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence

from agent.daemon.workers.keeper import (
    KeptProcess,
    retire_zygote,
    shared_keeper,
    use_zygote,
    zygote_ready,
    zygote_running,
)
from agent.daemon.workers.output import Sink
from agent.daemon.workers.spawn import spawn
from agent.errors import AgentError

log = logging.getLogger("elastic_agent")
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


class WarmPool:
    """The node's pre-started workers between rounds: one per local rank once filled, handed
    to the next round's group (:meth:`take`), given up while the workers recover in process.
    Off when ``--prewarm`` is, or once pre-starting failed (workers then start cold)."""

    def __init__(self, python: str, environ: dict[str, str], nproc: int, *, enabled: bool) -> None:
        self.python = python
        self.env = {**environ, "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS", "1")}
        self.nproc = nproc
        self.enabled = enabled
        self.workers: list[WarmWorker] = []

    def fill(self) -> None:
        """Keep one pre-started worker per local rank ready for the next round."""
        if not self.enabled:
            return
        self.workers = [w for w in self.workers if w.alive()]
        while len(self.workers) < self.nproc:
            try:
                self.workers.append(WarmWorker(self.python, self.env))
            except AgentError as exc:
                log.warning("cannot pre-start workers (%s); starting them cold", exc)
                self.enabled = False
                return

    def take(self, count: int) -> list[WarmWorker]:
        """Up to ``count`` pre-started workers, for a group about to start (it adopts them)."""
        taken, self.workers = self.workers[:count], self.workers[count:]
        return taken

    def ready(self) -> bool:
        """Whether the next workers could start at once: none are pre-started (they start
        cold whenever asked), or the zygote has imported what they need."""
        return not (self.enabled and self.workers) or zygote_ready()

    def retire(self) -> None:
        """The workers recover in process: they are not restarted when the job changes, so
        no pre-started interpreter is kept beside them (:meth:`fill` brings it back the
        moment new workers may be needed)."""
        if self.workers or zygote_running():
            log.info("workers recover in process: the pre-started interpreter is given up")
        self.discard()
        retire_zygote()

    def discard(self) -> None:
        for warm in self.workers:
            warm.discard()
        self.workers.clear()
