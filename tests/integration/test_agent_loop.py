"""The agent's loop in-process: real Agent objects (one thread each) over the in-memory store,
with short timings and a recording fake worker group instead of processes, as torch's
``TestAgent(SimpleElasticAgent)`` records ``_stop_workers``. What the loop decides is asserted
through what it does to the groups, to etcd's keys and through its exit code."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.daemon.config.layers import load_config
from agent.daemon.loop import Agent
from rendezvous.memory_store import MemoryStore
from rendezvous.state import JobStatus, Outcome, RestartCount
from tests.waiting import wait_until

TIMINGS = ["--lease-ttl", "2", "--last-call", "0.1", "--scale-up-cooldown", "0.2", "--monitor-interval", "0.01"]


class FakeGroup:
    """A worker group that runs nothing: the test sets the exit codes. After SIGTERM its
    workers take ``stop_seconds`` to exit, as slow GPU workers do."""

    def __init__(self, command, envs, log_dir, prefixes, warm, stop_seconds: float = 0.0) -> None:
        self.envs = envs
        self.codes: list[int | None] = [None] * len(envs)
        self.started = self.stopped = False
        self.pids = [10_000 + i for i in range(len(envs))]
        self.stop_seconds = stop_seconds
        self.terminated_at: float | None = None

    def start(self) -> None:
        self.started = True

    def poll(self) -> list[int | None]:
        if self.terminated_at is not None and time.monotonic() - self.terminated_at >= self.stop_seconds:
            self._exit()
        return list(self.codes)

    def terminate(self) -> None:
        self.stopped = True
        if self.terminated_at is None:
            self.terminated_at = time.monotonic()

    def settled(self) -> bool:
        return None not in self.poll()

    def kill(self) -> None:
        self._exit()

    def relabel(self, routes) -> None:
        pass

    def stop(self, timeout: float) -> None:
        """Blocks, as the real group does, until the workers exited or ``timeout``."""
        self.terminate()
        assert self.terminated_at is not None
        wait_until(self.settled, min(timeout, self.stop_seconds) + 1, "the fake workers to exit")
        self.kill()

    def _exit(self) -> None:
        self.stopped = True
        self.codes = [-15 if c is None else c for c in self.codes]

    def failure_summary(self, local_rank: int) -> str:
        return f"local rank {local_rank} exited with code {self.codes[local_rank]}"

    def stderr_tail(self, local_rank: int, lines: int = 10) -> list[str]:
        return ["boom"]

    @property
    def rank(self) -> int:
        return int(self.envs[0]["RANK"])

    @property
    def round(self) -> int:
        return int(self.envs[0]["ELASTIC_AGENT_ROUND"])


class Node:
    def __init__(self, store: MemoryStore, node_id: str, tmp: Path, *flags: str, stop_seconds: float = 0.0) -> None:
        self.groups: list[FakeGroup] = []
        self.stop_seconds = stop_seconds
        argv = ["--min-nodes", "2", "--max-nodes", "3", "--job-id", "loop", "--etcd-endpoints", "127.0.0.1:1",
                "--node-id", node_id, "--node-addr", "127.0.0.1", "--log-dir", str(tmp / node_id),
                "--no-prewarm", "--max-restarts", "1", *TIMINGS, *flags, "--", "python", "train.py"]
        config = load_config(argv, {})
        self.agent = Agent(config, store, environ={"PATH": "/usr/bin"}, group_factory=self._group)
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"agent-{node_id}")

    def _group(self, *args) -> FakeGroup:
        group = FakeGroup(*args, stop_seconds=self.stop_seconds)
        self.groups.append(group)
        return group

    def _run(self) -> None:
        self.code = self.agent.run()

    @property
    def group(self) -> FakeGroup:
        return self.groups[-1]

    def training_in(self, round_number: int) -> bool:
        return bool(self.groups) and self.group.round == round_number and not self.group.stopped

    def finished(self, timeout: float = 10) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the agent's loop did not end"
        assert self.code is not None
        return self.code


@pytest.fixture
def store():
    s = MemoryStore()
    yield s
    s.close()


@pytest.fixture
def nodes(store, tmp_path):
    made: list[Node] = []

    def make(node_id: str, *flags: str, stop_seconds: float = 0.0) -> Node:
        node = Node(store, node_id, tmp_path, *flags, stop_seconds=stop_seconds)
        made.append(node)
        node.thread.start()
        return node

    yield make
    for node in made:  # leave whatever is still running; never leave a thread behind
        node.agent.signals.request("test over")
        node.agent.signals.count = 2
    for node in made:
        node.thread.join(10)


def test_two_nodes_get_ranks_and_the_torchrun_environment(nodes) -> None:
    a, b = nodes("a"), nodes("b")
    wait_until(lambda: a.training_in(1) and b.training_in(1), 10, "both nodes training in round 1")
    assert {a.group.rank, b.group.rank} == {0, 1}
    env = a.group.envs[0]
    assert (env["WORLD_SIZE"], env["GROUP_WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["MASTER_ADDR"]) == \
        ("2", "2", "1", "127.0.0.1")
    assert a.agent.state == "running"


def test_a_worker_failure_restarts_every_node_once_and_charges_the_budget(nodes, store) -> None:
    a, b = nodes("a"), nodes("b")
    wait_until(lambda: a.training_in(1) and b.training_in(1), 10, "round 1")
    first_b = b.group
    a.group.codes = [1]
    wait_until(lambda: a.training_in(2) and b.training_in(2), 10, "both restarted in round 2")
    assert first_b.stopped  # b's healthy workers were stopped too: the whole group restarts
    kv, _ = store.get(a.agent.settings.restarts_key)
    assert kv is not None and RestartCount.decode(kv.key, kv.value).count == 1
    assert len(a.groups) == len(b.groups) == 2  # one restart, not two


def test_a_node_slow_to_stop_stays_in_the_next_round_one_restart_charged_once(nodes, store) -> None:
    # b's workers take 1.5 s to stop, much longer than --last-call (0.1 s): b joins the next
    # round at once and stops its workers meanwhile, so it is not left out of it (which
    # would cost a second restart to grow the job back) and the failure is charged.
    a, b = nodes("a", "--min-nodes", "1"), nodes("b", "--min-nodes", "1", stop_seconds=1.5)
    wait_until(lambda: a.training_in(1) and b.training_in(1) and a.group.envs[0]["WORLD_SIZE"] == "2", 10,
               "round 1 with both")
    a.group.codes = [1]
    wait_until(lambda: a.training_in(2) and b.training_in(2), 10, "both in round 2")
    assert a.group.envs[0]["WORLD_SIZE"] == "2"
    time.sleep(1.0)  # a window for what must not happen: a scale-up round (0.2 s cool-down)
    assert a.training_in(2) and b.training_in(2) and len(a.groups) == len(b.groups) == 2
    kv, _ = store.get(a.agent.settings.restarts_key)
    assert kv is not None and RestartCount.decode(kv.key, kv.value).count == 1


def test_a_job_that_succeeded_while_this_node_was_fenced_ends_with_its_outcome(nodes, store) -> None:
    """Cut off from etcd, both nodes fence; meanwhile (another node, say) the job is recorded
    as succeeded. When etcd answers again each agent ends with that outcome (exit 0), rather
    than rejoining a finished job or failing."""
    a, b = nodes("a"), nodes("b")
    wait_until(lambda: a.training_in(1) and b.training_in(1), 10, "round 1")
    store.available = False
    wait_until(lambda: a.group.stopped and b.group.stopped, 5, "both nodes' workers fenced")
    with store._lock:  # written where the cut-off agents cannot see it: the outage hides it
        store._write(a.agent.settings.status_key, JobStatus(Outcome.SUCCEEDED, "every worker done").encode(), 0)
    store.available = True
    assert a.finished(15) == 0 and b.finished(15) == 0
    assert a.agent.state == "succeeded" and len(a.groups) == 1 and len(b.groups) == 1  # nothing restarted


def test_the_budget_spent_fails_the_job_on_every_node(nodes, store) -> None:
    a, b = nodes("a"), nodes("b")
    for round_number in (1, 2):  # --max-restarts 1: the second failure ends the job
        wait_until(lambda: a.training_in(round_number) and b.training_in(round_number), 10, f"round {round_number}")
        b.group.codes = [3]
    assert a.finished() == 1 and b.finished() == 1
    kv, _ = store.get(a.agent.settings.status_key)
    assert kv is not None and JobStatus.decode(kv.key, kv.value).outcome == Outcome.FAILED


def test_every_worker_done_is_success_on_every_node(nodes) -> None:
    a, b = nodes("a"), nodes("b")
    wait_until(lambda: a.training_in(1) and b.training_in(1), 10, "round 1")
    a.group.codes = [0]
    b.group.codes = [0]
    assert a.finished() == 0 and b.finished() == 0
    assert a.agent.state == "succeeded"


def test_a_leave_request_stops_the_workers_opens_the_next_round_and_exits_3(nodes, store) -> None:
    a, b, c = nodes("a"), nodes("b"), nodes("c")
    wait_until(lambda: all(n.training_in(1) for n in (a, b, c)), 10, "three nodes in round 1")
    c.agent.signals.request("preemption notice: test")
    assert c.finished() == 3
    assert c.group.stopped
    wait_until(lambda: a.training_in(2) and b.training_in(2), 10, "the others in round 2 without c")
    rnd = a.agent.participant.current_round
    assert rnd is not None and rnd.reason.startswith("node_left: c")
    assert a.group.envs[0]["WORLD_SIZE"] == "2"


def test_a_node_joining_drains_nothing_without_the_helper_and_grows_the_world(nodes) -> None:
    a, b = nodes("a"), nodes("b")
    wait_until(lambda: a.training_in(1) and b.training_in(1), 10, "round 1")
    c = nodes("c")
    wait_until(lambda: all(n.training_in(2) for n in (a, b, c)), 10, "three nodes in round 2")
    assert c.group.rank == 2  # a newcomer follows the survivors
    assert a.groups[0].stopped and a.group.envs[0]["WORLD_SIZE"] == "3"


def test_cut_off_from_etcd_the_workers_are_fenced_within_the_lease(nodes, store) -> None:
    import time

    a, b = nodes("a"), nodes("b")
    wait_until(lambda: a.training_in(1) and b.training_in(1), 10, "round 1")
    first = a.group
    store.available = False
    cut = time.monotonic()
    wait_until(lambda: first.stopped, 5, "a's workers fenced")
    assert time.monotonic() - cut < 2.0  # before etcd could expire the 2 s lease
    store.available = True
    wait_until(lambda: a.training_in(a.group.round) and b.training_in(a.group.round) and a.group.round > 1,
               15, "both training again in a new round")
