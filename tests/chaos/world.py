"""One scenario's world: hosts in network namespaces (tests/chaos/netns.py), a 3-member etcd
cluster on three of them, a job's agents on the others, started as the README shows
(tests/e2e/harness.py: default flags, one working directory, one shared checkpoint
directory), and the watchers that record what happened. At the end, :meth:`World.verdict`
checks the invariants of DESIGN.md section 7 on what it left (tests/chaos/invariants.py).

Everything is stopped and removed on leaving the ``with``, also on failure: agents and
everything below them (by pid), the etcd members (by pid), the namespaces, the temp dirs.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

from rendezvous.settings import Settings
from tests.chaos import history, invariants
from tests.chaos.evidence import CheckpointWatcher, PidWatch, Timeline, timeline, worker_pids
from tests.chaos.netns import Topology
from tests.e2e.harness import ELASTIC_AGENT, PYTHON, TRAIN, AgentProc, Cluster
from tests.etcd_cluster import EtcdCluster
from tests.waiting import wait_until

ETCD_HOSTS = ("e0", "e1", "e2")
NODE_HOSTS = ("n0", "n1", "n2", "n3", "n4")
MIN_NODES, MAX_NODES = 2, 4
# What the agent's default flags give (agent.daemon.config.options): a cut-off node's workers must be
# gone this long after its last word with etcd (invariant 2), give or take the fence guard's poll.
LEASE_TTL_S = 10.0
SHUTDOWN_TIMEOUT_S = 10.0
FENCE_SLACK_S = 2.0
STATUS_TIMEOUT_S = 60.0  # a cold CLI import on 2 loaded cores
START_WAIT_S = 150.0  # three or more cold agents importing torch on 2 shared cores


def train(*extra: str, steps: int = 100_000) -> list[str]:
    return [PYTHON, str(TRAIN), "--steps", str(steps), "--checkpoint-every", "10", *extra]


class World:
    def __init__(self, job_id: str, tag: str, relayed: tuple[str, ...] = ()) -> None:
        """``relayed``: node hosts whose link can be made lossy (tests/chaos/lossy.py)."""
        self.job_id = job_id
        self.net = Topology([*ETCD_HOSTS, *NODE_HOSTS], tag=tag, relayed=relayed)
        self.settings = Settings(job_id, MIN_NODES, MAX_NODES)
        self._stack = contextlib.ExitStack()
        self.etcd: EtcdCluster
        self.cluster: Cluster
        self.hosts: dict[str, str] = {}  # node id -> the host it runs on
        self.checkpoints: CheckpointWatcher
        self.pids = PidWatch()
        self.extra_violations: list[str] = []

    def __enter__(self) -> World:
        try:
            self._stack.enter_context(self.net)
            self.etcd = self._stack.enter_context(EtcdCluster(
                hosts=[(self.net.addr(h), tuple(self.net.wrap(h))) for h in ETCD_HOSTS]))
            self.cluster = Cluster(job_id=self.job_id, endpoints=self.etcd.endpoints)
            self._stack.callback(self.cluster.close)  # its temp dir; the agents are stopped first, below
            self._stack.callback(self.cluster.stop_agents)
            self.checkpoints = CheckpointWatcher(self.cluster.checkpoint_dir).start()
            self._stack.callback(self.checkpoints.stop)
            self.pids.start()
            self._stack.callback(self.pids.stop)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    # --- nodes ---------------------------------------------------------------------------
    def start_node(self, host: str, node_id: str | None = None, command: list[str] | None = None) -> AgentProc:
        """An agent on ``host`` with the default flags but those that differ between hosts (as
        harness.Cluster.start_agent gives them); its workers' gloo uses the host's interface."""
        node_id = node_id or host
        self.hosts[node_id] = host
        return self.cluster.start_agent(node_id, min_nodes=MIN_NODES, max_nodes=MAX_NODES, nproc=1,
                                        command=command or train(), wrap=self.net.wrap(host),
                                        node_addr=self.net.addr(host), env={"GLOO_SOCKET_IFNAME": "eth0"})

    @property
    def agents(self) -> list[AgentProc]:
        return list(self.cluster.agents.values())

    def agent(self, node_id: str) -> AgentProc:
        return self.cluster.agents[node_id]

    def timeline(self) -> Timeline:
        return timeline(self.agents)

    def wait_training(self, world_size: int, since: float, timeout: float = 90.0, count: int = 1,
                      after_round: int = 0) -> float:
        """When the ``count``-th step at ``world_size`` after ``since``, by workers of a round
        after ``after_round``, was printed."""
        def reached() -> float | None:
            found = [s.t for s in self.timeline().steps
                     if s.t > since and s.world_size == world_size and s.round > after_round]
            return found[count - 1] if len(found) >= count else None

        return wait_until(reached, timeout, f"{count} steps at world size {world_size}", interval=0.1)

    def start_nodes(self, hosts: list[str], command: list[str] | None = None) -> dict[str, AgentProc]:
        t0 = time.monotonic()
        started = {host: self.start_node(host, command=command) for host in hosts}
        self.wait_training(len(hosts), t0, START_WAIT_S, count=3)
        wait_until(lambda: all(a.group_rank() is not None and a.worker_pids() for a in started.values()), 30,
                   "every agent's group rank and workers", interval=0.1)
        return started

    def current_round(self) -> int:
        """The newest round any agent said it runs."""
        return max((c.round for c in self.timeline().claims), default=0)

    def status(self, *args: str) -> str:
        """What ``elastic-agent status`` prints for the job, run on an etcd host (etcd is
        reachable there whatever a scenario did to the nodes' links)."""
        proc = subprocess.run([*self.net.wrap(ETCD_HOSTS[0]), *ELASTIC_AGENT, "status", "--etcd-endpoints",
                               self.etcd.endpoints, "--job-id", self.job_id, *args],
                              capture_output=True, text=True, timeout=STATUS_TIMEOUT_S, cwd=self.cluster.workdir)
        return proc.stdout + proc.stderr

    def by_rank(self, rank: int, among: list[AgentProc] | None = None) -> AgentProc:
        return next(a for a in (among or self.agents) if a.proc.poll() is None and a.group_rank() == rank)

    def watch_workers(self, agent: AgentProc) -> list[int]:
        pids = agent.worker_pids()
        self.pids.watch(pids)
        return pids

    # --- the end -------------------------------------------------------------------------
    def verdict(self, *, until: float | None = None) -> list[str]:
        """Every invariant violation the run left: etcd's whole history (invariant 1), what the
        agents said they ran against it, the checkpoint directory (invariant 4), tracebacks
        (invariant 5), and whatever the scenario itself recorded (2, 3)."""
        del until
        self.checkpoints.scan()
        tl = self.timeline()
        out = list(self.extra_violations)
        try:
            events = history.read(self.etcd.endpoints, self.settings.root, wrap=self.net.wrap(ETCD_HOSTS[0]))
        except history.HistoryError as exc:
            out.append(f"inv 1: etcd's history could not be read: {exc}")
        else:
            rounds = history.check(events, self.settings)
            out += [f"inv 1: {v}" for v in rounds.violations]
            out += invariants.ranks_as_assigned(tl, rounds)
        bad, self.checkpoint_summary = invariants.checkpoints_complete(self.cluster.checkpoint_dir)
        out += bad
        out += invariants.no_stale_loads(tl, self.checkpoints)
        out += invariants.no_tracebacks(self.agents)
        return out

    def keep_logs(self, directory: Path) -> Path:
        """Each agent's console, and each etcd member's log, under ``directory`` (for a look
        after a failure; the world's own temp dirs are removed)."""
        directory.mkdir(parents=True, exist_ok=True)
        for agent in self.agents:
            (directory / f"{agent.node_id}.log").write_text(
                "\n".join(f"{line.t:.3f} {line.text}" for line in list(agent.lines)) + "\n")
        for member in self.etcd.members:
            log = member.data_dir / "etcd.log"
            if log.exists():
                (directory / f"etcd-{member.name}.log").write_bytes(log.read_bytes())
        return directory

    def started_workers(self, agent: AgentProc, since: float = 0.0) -> list[int]:
        return worker_pids(agent, since)
