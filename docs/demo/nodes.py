"""What the demo starts, and how it stops it: one etcd and the agents, each by its own pid.

Every process lives under one temporary directory (etcd's data, each node's working
directory, the shared checkpoints), so "nothing left behind" is checkable: no process whose
working directory or command line points into it survives :meth:`Cluster.close`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.daemon.cli import EMBEDDED_ETCD_ARGS
from agent.daemon.workers.procfs import descendants
from rendezvous.etcd.server import EtcdServer

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "docs" / "examples" / "train_ddp.py"
TRAIN_SHARDED = REPO / "docs" / "examples" / "train_fsdp.py"
PYTHON = sys.executable
# The console script a user runs; `python -m agent` where the project was never installed.
_SCRIPT = Path(sys.executable).with_name("elastic-agent")
ELASTIC_AGENT = [str(_SCRIPT)] if _SCRIPT.exists() else [PYTHON, "-m", "agent"]

# What the agents print: their own log lines, and their workers' lines as "[node/local_rank] ...".
STEP_RE = re.compile(r"^\[[^\]/]+/\d+\] step (\d+) world_size (\d+)\b")
RESUMED_RE = re.compile(r"^\[[^\]/]+/\d+\] (?:resumed from step|starting from step) (\d+)")
# A drain: the worker's own line (the el.step loop prints it after its checkpoint), or the agent's
# order to its workers (el.run's workers stop there in process and print nothing).
DRAINED_RE = re.compile(r"^\[[^\]/]+/\d+\] drained at step (\d+)|\bINFO workers stop after step (\d+) and exit\b")
PORT_RE = re.compile(r"metrics and health on http://[^/]+:(\d+)/metrics")
KEEPER_EXIT_GRACE = 5.0  # seconds a keeper may take to end after its agent before it counts as left over


@dataclass(frozen=True)
class Job:
    """The job every node runs: the flags of ``elastic-agent start`` and the training script's.

    ``inprocess``: the helper runs the loop (``el.run``): a membership change re-forms the
    process group inside the running workers, which keep the state in memory. Otherwise the
    ``el.step`` loop: the workers are restarted and resume from the last checkpoint on disk.
    ``sharded``: the FSDP2 example (each rank holds only its shards) instead of the DDP one."""

    job_id: str = "demo"
    min_nodes: int = 2
    max_nodes: int = 4
    steps: int = 150
    checkpoint_every: int = 10
    inprocess: bool = True
    sharded: bool = False

    def describe(self) -> str:
        script = (TRAIN_SHARDED if self.sharded else TRAIN).relative_to(REPO)
        return f"{script}, " + ("in-process recovery, el.run" if self.inprocess else "process restart, el.step")

    def command(self) -> list[str]:
        common = ["--steps", str(self.steps), "--checkpoint-every", str(self.checkpoint_every)]
        if self.sharded:  # paced as the DDP example is by default, so that the story can act between steps
            return [PYTHON, str(TRAIN_SHARDED), *common, "--step-time", "0.1",
                    "--loop", "run" if self.inprocess else "step"]
        return [PYTHON, str(TRAIN), *common, *(["--inprocess"] if self.inprocess else [])]


@dataclass(frozen=True)
class Mark:
    t: float  # time.monotonic() when the line was read
    value: int
    world: int = 0


@dataclass
class Node:
    """One simulated node: an ``elastic-agent start`` process in its own session and directory."""

    node_id: str
    proc: subprocess.Popen[str]
    workdir: Path
    started: float
    lines: list[str] = field(default_factory=list)
    metrics_port: int | None = None
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> list[int]:
        """``kill -9`` of the node: its agent's process group. Its workers run in sessions of
        their own and must die by the agent's arrangement (its keeper), as on a real machine;
        returns what was below the agent, so that :meth:`Cluster.close` can make sure."""
        below = descendants(self.pid)
        self.killed = True
        _signal_group(self.pid, signal.SIGKILL)
        return below

    def stop(self) -> None:
        """Stop at once, whatever it is doing: the agent's group and everything below it, by pid."""
        if self.proc.poll() is None:
            below = descendants(self.pid)
            _signal_group(self.pid, signal.SIGKILL)
            for pid in below:
                _signal(pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, n: int = 15) -> str:
        return "\n".join(f"    {self.node_id}| {line}" for line in self.lines[-n:])


class Cluster:
    """The etcd and the nodes of one demo run, and what their consoles said (time-stamped)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.root = Path(tempfile.mkdtemp(prefix="elastic-agent-demo-"))
        self.checkpoint_dir = self.root / "checkpoints"
        self.etcd = EtcdServer(data_dir=str(self.root / "etcd"), extra_args=EMBEDDED_ETCD_ARGS)
        self.nodes: dict[str, Node] = {}
        self.steps: list[Mark] = []  # every "step N world_size W" of the rank-0 worker, in order read
        self.resumes: list[Mark] = []
        self.drains: list[Mark] = []
        self.started_pids: list[int] = []

    def start_etcd(self) -> None:
        self.etcd.start()
        assert self.etcd.proc is not None
        self.started_pids.append(self.etcd.proc.pid)

    def start_node(self, node_id: str) -> Node:
        """``elastic-agent start`` as a user types it on each machine; only what differs between
        machines is given per node (its id, its address, its own working directory)."""
        job = self.job
        workdir = self.root / node_id
        workdir.mkdir()
        args = [
            *ELASTIC_AGENT, "start",
            "--min-nodes", str(job.min_nodes), "--max-nodes", str(job.max_nodes), "--nproc-per-node", "1",
            "--etcd-endpoints", self.etcd.endpoint, "--job-id", job.job_id,
            "--node-id", node_id, "--node-addr", "127.0.0.1", "--metrics-port", "0",
            "--checkpoint-dir", str(self.checkpoint_dir),
            "--", *job.command(),
        ]
        # The user's own ELASTIC_AGENT_* / torchrun settings would change the story: leave them out.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ELASTIC_AGENT_", "PET_"))}
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, env=env, cwd=str(workdir), start_new_session=True)
        node = Node(node_id, proc, workdir, time.monotonic())
        self.nodes[node_id] = node
        self.started_pids.append(proc.pid)
        threading.Thread(target=self._read, args=(node,), name=f"read-{node_id}", daemon=True).start()
        return node

    def _read(self, node: Node) -> None:
        assert node.proc.stdout is not None
        for raw in node.proc.stdout:
            now = time.monotonic()
            line = raw.rstrip("\n")
            node.lines.append(line)
            if m := STEP_RE.match(line):
                self.steps.append(Mark(now, int(m.group(1)), int(m.group(2))))
            elif m := RESUMED_RE.match(line):
                self.resumes.append(Mark(now, int(m.group(1))))
            elif m := DRAINED_RE.search(line):
                self.drains.append(Mark(now, int(m.group(1) or m.group(2))))
            elif node.metrics_port is None and (m := PORT_RE.search(line)):
                node.metrics_port = int(m.group(1))

    # --- what the consoles said -----------------------------------------------------------
    def last_step(self) -> Mark | None:
        return self.steps[-1] if self.steps else None

    def last_step_before(self, t: float) -> Mark | None:
        return next((s for s in reversed(list(self.steps)) if s.t <= t), None)

    def first_step_after(self, t: float, *, world: int | None = None, above: int = -1) -> Mark | None:
        return next((s for s in list(self.steps)
                     if s.t > t and s.value > above and (world is None or s.world == world)), None)

    def first_after(self, marks: list[Mark], t: float) -> Mark | None:
        return next((m for m in list(marks) if m.t > t), None)

    # --- stopping -------------------------------------------------------------------------
    def close(self) -> list[int]:
        """Stop every node and etcd, then anything still running in our directory (a worker
        whose agent was killed, if its keeper failed); remove the directory. Returns the pids
        that had to be stopped that last way."""
        for node in self.nodes.values():
            node.stop()
        etcd = self.etcd.proc
        try:
            self.etcd.stop(remove_data=False)
        finally:
            if etcd is not None and etcd.poll() is None:
                etcd.kill()
                etcd.wait(timeout=10)
        # A keeper ends on its own once its agent is gone (it kills what is below it first):
        # give it that moment; only what is still running after it is a leftover.
        stragglers = self._wait_until_nothing_runs(KEEPER_EXIT_GRACE)
        for pid in stragglers:
            _signal(pid, signal.SIGKILL)
        self._wait_until_nothing_runs(5.0)
        shutil.rmtree(self.root, ignore_errors=True)
        return stragglers

    def _wait_until_nothing_runs(self, seconds: float) -> list[int]:
        """Wait up to ``seconds`` for every process in our directory to end; what still runs."""
        deadline = time.monotonic() + seconds
        while (running := processes_under(self.root)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return running


def processes_under(root: Path) -> list[int]:
    """Pids of live processes whose working directory or command line is inside ``root``."""
    inside = str(root) + os.sep
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # a zombie runs nothing; its parent reaps it
            cwd = os.readlink(f"/proc/{entry}/cwd") + os.sep
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace").replace("\0", " ")
        except OSError:
            continue
        if cwd.startswith(inside) or inside in cmdline + os.sep:
            found.append(int(entry))
    return found


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
