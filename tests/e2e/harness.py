"""Whole-process harness: real etcd, real agent processes, real workers, all on 127.0.0.1.

Shared by the end-to-end tests and the benchmark scripts. Each agent runs in its own process
group and is stopped by pid/process group; its console is read line by line and time-stamped,
so tests can wait for what a user would see ("step 12 ...") with a deadline.
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
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from agent.daemon.workers import procfs
from agent.daemon.workers.local import snapshots_of
from agent.daemon.workers.procfs import cpu_seconds  # noqa: F401 - re-exported for the benches
from rendezvous.etcd.server import EtcdServer, ServerTls
from tests.conftest import torchrun_env
from tests.waiting import alive, wait_until  # noqa: F401 - re-exported for tests and benches

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
# The console script a user runs; `python -m agent` where the project was never installed.
_SCRIPT = Path(sys.executable).with_name("elastic-agent")
ELASTIC_AGENT = [str(_SCRIPT)] if _SCRIPT.exists() else [PYTHON, "-m", "agent"]
TRAIN = REPO / "docs" / "examples" / "train_ddp.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")  # the console script torch's wheel installs
STEP_RE = re.compile(r"\bstep (\d+) world_size (\d+)")
METRICS_RE = re.compile(r"metrics and health on http://[^\s/]+:(\d+)/metrics")  # the agent's log, at start
RESUME_RE = re.compile(r"(?:resumed from step|starting from step) (\d+)")


@dataclass
class Line:
    t: float  # time.monotonic() when read
    text: str


@dataclass
class AgentProc:
    node_id: str
    proc: subprocess.Popen[str]
    metrics_port: int  # 0: the agent's own choice, read from its log (``scrape``)
    log_dir: Path  # this node's own directory of attempts under the shared default --log-dir
    lines: list[Line] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def start_reader(self) -> None:
        def pump() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                self.lines.append(Line(time.monotonic(), raw.rstrip("\n")))

        self._reader = threading.Thread(target=pump, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return "\n".join(line.text for line in self.lines)

    def wait(self, timeout: float) -> int:
        """The agent's exit code; past ``timeout``, an AssertionError that shows what it printed."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.node_id}'s agent still running after {timeout:g} s; "
                                 f"its console's end:\n{self.text()[-3000:]}") from None
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def last_step_at(self) -> float:
        """When this node last printed a step (0.0: never): under torchrun only the node that
        runs global rank 0, group rank 0, does."""
        return max((line.t for line in list(self.lines) if STEP_RE.search(line.text)), default=0.0)

    def group_rank(self) -> int | None:
        """This node's group rank in its latest round, as its agent logged it."""
        for line in reversed(self.lines):
            if "this node is group rank" in line.text:
                return int(line.text.split("this node is group rank")[1].split(";")[0])
        return None

    def worker_pids(self) -> list[int]:
        """Pids of the workers of this node's latest round, as its agent logged them."""
        for line in reversed(self.lines):
            if "workers (global ranks" in line.text and "pids " in line.text:
                return [int(p) for p in line.text.split("pids ")[1].split(")")[0].split(",")]
        return []

    def descendants(self) -> list[int]:
        """Pids of every process below the agent (its keeper, workers and what they started)."""
        return procfs.descendants(self.proc.pid)

    def kill_node(self, with_workers: bool = False) -> list[int]:
        """``kill -9`` of the agent. Our workers must die with it on their own (they run in
        their own sessions, so only the agent's doing can stop them); ``with_workers`` also
        kills them here, for launchers that do not (torchrun). Returns the pids that were
        below the agent (its keeper, workers, and whatever those started)."""
        workers = self.descendants()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if with_workers:
            for pid in workers:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self.proc.wait(timeout=10)
        return workers

    def freeze(self) -> list[int]:
        """SIGSTOP the whole node, agent and everything below it: no socket closes, nothing
        answers (a frozen kernel, a reclaimed machine). Returns what was frozen, for thaw."""
        frozen = [self.proc.pid, *self.descendants()]
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        return frozen

    @staticmethod
    def thaw(frozen: list[int]) -> None:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def scrape(self, path: str = "/metrics") -> tuple[int, str]:
        if not self.metrics_port:
            self.metrics_port = int(wait_until(lambda: next(
                (m.group(1) for line in list(self.lines) if (m := METRICS_RE.search(line.text))), None),
                60, f"{self.node_id}'s metrics port in its log"))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


def rss_mib(pid: int) -> float:
    """Resident memory of a process, MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on 127.0.0.1:``port`` (torchrun's c10d store host)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


class Cluster:
    """An etcd and the agents of one job. ``etcd_tls`` and ``etcd_args`` go to the etcd server
    (a TLS etcd; e.g. ``--auth-token-ttl``); the agents' TLS flags go in ``start_agent(extra=)``."""

    def __init__(self, job_id: str = "e2e", workdir: str | None = None, *, etcd_tls: ServerTls | None = None,
                 etcd_args: tuple[str, ...] = (), endpoints: str | None = None, start_etcd: bool = True) -> None:
        """``endpoints``: an etcd cluster the test runs itself (no etcd of our own is started);
        ``start_etcd=False``: the test starts ``self.etcd`` later (etcd down while agents boot)."""
        self.job_id = job_id
        self._endpoints = endpoints
        self._start_etcd = start_etcd and endpoints is None
        self._own = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="elastic-agent-e2e-"))
        self.checkpoint_dir = self.workdir / "ckpt"
        self.etcd = EtcdServer(data_dir=str(self.workdir / "etcd"), tls=etcd_tls, extra_args=etcd_args)
        self.agents: dict[str, AgentProc] = {}

    @property
    def endpoints(self) -> str:
        return self._endpoints or self.etcd.endpoint

    def __enter__(self) -> Cluster:
        try:
            if self._start_etcd:
                self.etcd.start()
        except BaseException:
            self.close()  # leave no temp dir behind when etcd does not come up
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_agent(self, node_id: str, *, min_nodes: int = 2, max_nodes: int = 4, nproc: int = 2,
                    command: list[str] | None = None, extra: list[str] | None = None,
                    env: dict[str, str] | None = None, wrap: list[str] | None = None,
                    node_addr: str = "127.0.0.1") -> AgentProc:
        """An agent started as the README shows, in the cluster's one working directory (so
        every agent shares the default --log-dir) with one shared --checkpoint-dir. Only what
        differs between hosts on a real cluster is given per agent: the node id, the address
        its peers reach it on, and (all agents share this one host) its metrics port: 0, the
        agent binds a free one and logs it (a port chosen here could be taken before the agent
        binds it). ``wrap`` runs it elsewhere (``ip netns exec NS``: a host of tests/chaos/netns.py)."""
        args = [
            *(wrap or []), *ELASTIC_AGENT, "start",
            "--min-nodes", str(min_nodes), "--max-nodes", str(max_nodes),
            "--nproc-per-node", str(nproc), "--etcd-endpoints", self.endpoints,
            "--job-id", self.job_id, "--checkpoint-dir", str(self.checkpoint_dir),
            "--node-id", node_id, "--node-addr", node_addr, "--metrics-port", "0",
            *(extra or []), "--",
            *(command or [PYTHON, str(TRAIN), "--steps", "100000"]),
        ]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=full_env, cwd=str(self.workdir), start_new_session=True)
        agent = AgentProc(node_id, proc, 0, self.workdir / "elastic-agent-logs" / self.job_id / node_id)
        agent.start_reader()
        self.agents[node_id] = agent
        return agent

    def start_torchrun(self, node_id: str, *, rdzv_port: int = 0, min_nodes: int = 2, max_nodes: int = 4,
                       nproc: int = 1, command: list[str], tuned: bool = True,
                       max_restarts: int = 100, extra_env: dict[str, str] | None = None,
                       backend: str = "c10d", rdzv_conf: str = "") -> AgentProc:
        """torchrun with the c10d rendezvous on 127.0.0.1:rdzv_port: the first one started
        hosts the store. ``tuned`` uses the settings torchrun users tune for fast recovery.
        ``backend="etcd-v3"``: our plug-in (docs/torchrun-plugin.md) through the ``torchrun``
        script pip installed, on the cluster's etcd, peers reaching it on 127.0.0.1, with
        ``rdzv_conf`` as its --rdzv-conf (``rdzv_port`` and ``tuned`` do not apply)."""
        if backend == "c10d":
            launcher, endpoint = [PYTHON, "-m", "torch.distributed.run"], f"127.0.0.1:{rdzv_port}"
            conf = ["--rdzv-conf", "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3"] if tuned else []
        else:
            launcher, endpoint = [str(TORCHRUN)], self.endpoints
            conf = [*(["--rdzv-conf", rdzv_conf] if rdzv_conf else []), "--local-addr", "127.0.0.1"]
        args = [
            *launcher, "--nnodes", f"{min_nodes}:{max_nodes}",
            "--nproc-per-node", str(nproc), "--rdzv-backend", backend,
            "--rdzv-endpoint", endpoint, "--rdzv-id", self.job_id,
            "--max-restarts", str(max_restarts), "--monitor-interval", "0.1", *conf,
            *command[1:],  # torchrun runs the script with its own interpreter
        ]
        env = torchrun_env({**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}, self.workdir)
        for key in [k for k in env if k.startswith("ELASTIC_AGENT_")]:
            del env[key]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=str(self.workdir), start_new_session=True)
        agent = AgentProc(node_id, proc, 0, self.workdir)
        agent.start_reader()
        self.agents[node_id] = agent
        return agent

    # --- what a user reads ---------------------------------------------------------------
    def steps(self) -> list[tuple[float, int, int]]:
        """(time, step, world size) of every step line printed by any agent's rank-0 worker."""
        out = []
        for agent in self.agents.values():
            for line in list(agent.lines):
                m = STEP_RE.search(line.text)
                if m:
                    out.append((line.t, int(m.group(1)), int(m.group(2))))
        return sorted(out)

    def first_step_after(self, t: float, world_size: int | None = None) -> tuple[float, int, int] | None:
        for entry in self.steps():
            if entry[0] > t and (world_size is None or entry[2] == world_size):
                return entry
        return None

    def resumes(self) -> list[tuple[float, int]]:
        out = []
        for agent in self.agents.values():
            for line in list(agent.lines):
                m = RESUME_RE.search(line.text)
                if m:
                    out.append((line.t, int(m.group(1))))
        return sorted(out)

    def stop_agents(self) -> None:
        """SIGKILL every agent and everything below it, by pid (a frozen keeper cannot clean up
        after it); the working directory and etcd stay, for a look at what they left."""
        for agent in self.agents.values():
            below = agent.descendants() if agent.proc.poll() is None else []
            for pid in [agent.proc.pid, *below]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if agent.proc.poll() is None or agent.proc.returncode is None:
                agent.proc.wait(timeout=10)

    def close(self) -> None:
        self.stop_agents()
        self.etcd.stop()
        # A job killed before it succeeded leaves its snapshots in shared memory (RAM).
        shutil.rmtree(snapshots_of(self.job_id, self.workdir / "elastic-agent-logs"), ignore_errors=True)
        if self._own:
            shutil.rmtree(self.workdir, ignore_errors=True)


def consoles(agents: dict[str, AgentProc], since: float, chars: int = 2500) -> str:
    """The end of every agent's console from ``since`` on, for a failure to explain itself."""
    parts = []
    for name, agent in agents.items():
        text = "\n".join(line.text for line in list(agent.lines) if line.t >= since)
        parts.append(f"===== {name}\n{text[-chars:]}")
    return "\n".join(parts)
