"""torchft 0.2.0 in the benchmark: its own environment, its Lighthouse, one replica group per node.

torchft is installed at run time into ``build/torchft-venv`` (ignored by git; ``TORCHFT_VENV``
moves it) beside the same torch as ours, so its dependencies never touch the project's venv.
When it cannot be installed or imported, :func:`ensure_env` returns the error as pip or
python printed it, and the benchmark's table shows that instead of figures.

A node is what torchft's own examples run per replica group: ``torchrun --standalone
--nproc-per-node 1 tests/bench/torchft_job.py`` (the torchrun hosts that group's store),
with ``TORCHFT_LIGHTHOUSE`` and ``REPLICA_GROUP_ID``. The Lighthouse is tuned as torchrun is
(``TORCHFT_LIGHTHOUSE_ARGS``): a 100 ms quorum tick (its default), a 1 s heartbeat timeout
(default 5 s) and a 1 s join timeout (default 60 s), min replicas 2 (the job's min nodes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rendezvous.net import free_port
from tests.e2e.harness import REPO, STEP_RE, AgentProc, Cluster, wait_until

VERSION = "0.2.0"
VENV = Path(os.environ.get("TORCHFT_VENV", REPO / "build" / "torchft-venv"))
JOB = Path(__file__).with_name("torchft_job.py")
LIGHTHOUSE_ARGS = os.environ.get("TORCHFT_LIGHTHOUSE_ARGS",
                                 "--min_replicas 2 --quorum_tick_ms 100 --heartbeat_timeout_ms 1000 "
                                 "--join_timeout_ms 1000").split()
_CHECK = f"import torchft, importlib.metadata as m; assert m.version('torchft') == {VERSION!r}, m.version('torchft')"


def _torch_version() -> str:
    from importlib.metadata import version  # noqa: PLC0415 - the agent's own venv has torch

    return version("torch").split("+")[0]


def _tail(text: str, lines: int = 3) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip() and "WARNING: Location" not in line]
    return " / ".join(kept[-lines:]) or "(no output)"


def ensure_env() -> tuple[Path | None, str]:
    """(torchft's python, "") when torchft 0.2.0 imports there, installing it first if needed;
    (None, what failed, with its own error text) when it cannot be had."""
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", _CHECK], capture_output=True).returncode == 0:
        return python, ""
    steps = [[getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(VENV)],  # our python, our torch
             [str(python), "-m", "pip", "install", "--quiet", f"torch=={_torch_version()}", f"torchft=={VERSION}"],
             [str(python), "-c", _CHECK]]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"`{' '.join(step[:4])}` failed: {exc}"
        if done.returncode != 0:
            return None, f"`{' '.join(step[:4])}` exit {done.returncode}: {_tail(done.stderr + done.stdout)}"
    return python, ""


class Torchft:
    """The Lighthouse of one job and the replica groups started against it."""

    def __init__(self, cluster: Cluster, python: Path) -> None:
        self.cluster = cluster
        self.bin = python.parent
        self.port = free_port()
        self.lighthouse = subprocess.Popen(
            [str(self.bin / "torchft_lighthouse"), "--bind", f"127.0.0.1:{self.port}", *LIGHTHOUSE_ARGS],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def start(self, node_id: str, group: int) -> AgentProc:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ELASTIC_AGENT_", "VIRTUAL_ENV"))}
        env.update(PYTHONUNBUFFERED="1", TORCHFT_LIGHTHOUSE=f"http://127.0.0.1:{self.port}",
                   REPLICA_GROUP_ID=str(group), PATH=f"{self.bin}:{env.get('PATH', '')}")
        proc = subprocess.Popen([str(self.bin / "torchrun"), "--standalone", "--nproc-per-node", "1", str(JOB)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=str(self.cluster.workdir), start_new_session=True)
        agent = AgentProc(node_id, proc, 0, self.cluster.workdir)
        agent.start_reader()
        self.cluster.agents[node_id] = agent
        return agent

    def close(self) -> None:
        if self.lighthouse.poll() is None:
            self.lighthouse.kill()
        self.lighthouse.wait(timeout=10)


def replica_rank(agent: AgentProc) -> int | None:
    """The replica rank this group's latest committed step ran as."""
    for line in reversed(list(agent.lines)):
        if STEP_RE.search(line.text) and "replica_rank " in line.text:
            rank = line.text.split("replica_rank ")[1].split()[0]
            return int(rank) if rank.isdigit() else None
    return None


def rank_zero(agents: list[AgentProc]) -> AgentProc:
    return wait_until(lambda: next((a for a in agents if replica_rank(a) == 0), None), 10, "replica rank 0")
