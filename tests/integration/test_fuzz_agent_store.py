"""Garbage in every etcd key the agent reads, with the agent's real loop running over the
in-memory store (a recording fake worker group, short timings), as tests/integration/
test_agent_loop.py runs it (DESIGN.md invariant 5, STYLE.md lesson 4).

Whatever hypothesis writes (random bytes, JSON nested past any stack, a record of a newer
version, fields out of range) into ``round``, ``status``, ``restarts``, a join key, a presence
key, a node key, a done key or the node's goodput record, before the agent starts or while it
runs: the agent either runs on, or stops with a typed error (``RendezvousError`` or
``AgentError``, what ``elastic-agent start`` turns into one log line and an exit code) that
names the key. It never crashes with another exception, and never overwrites the value it
could not read: a record written by a newer agent must survive an older one. The one key it
may overwrite is its own goodput record, which it starts from zero (agent.observe.goodput).

Bounded: few examples, each a second or two, derandomized.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.daemon.config.layers import load_config
from agent.daemon.loop import Agent
from agent.daemon.workers.local import snapshots_of
from agent.errors import AgentError
from agent.observe.goodput import goodput_key
from rendezvous.errors import CorruptStateError, RendezvousError
from rendezvous.memory_store import MemoryStore
from rendezvous.settings import Settings
from rendezvous.state import (
    Assignment,
    JobStatus,
    JoinRecord,
    Member,
    NodeRecord,
    Outcome,
    RestartCount,
    RoundPhase,
    RoundState,
)

FUZZ = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
JOB = "fz"
S = Settings(job_id=JOB, min_nodes=1, max_nodes=2)
TIMINGS = ["--lease-ttl", "2", "--presence-ttl", "2", "--last-call", "0.05", "--scale-up-cooldown", "0.2",
           "--monitor-interval", "0.01", "--shutdown-timeout", "1"]
# Keys the agent reads (values or existence), each with a real record to garble.
TARGETS = {
    "round": (S.round_key, RoundState(5, RoundPhase.CLOSED, "", ("b",), Assignment(
        5, (Member("b", "127.0.0.1", 1),), "127.0.0.1", 29500)).encode()),
    "status": (S.status_key, JobStatus(Outcome.FAILED, "spent").encode()),
    "restarts": (S.restarts_key, RestartCount(1, "worker_failure").encode()),
    "join": (S.joined_key(1, "zz"), JoinRecord("zz", "127.0.0.1", 1, 29501).encode()),
    "presence": (S.presence_key("zz"), b""),
    "node": (S.node_key("zz"), NodeRecord("zz", "127.0.0.1", 1).encode()),
    "done": (f"{S.done_prefix(1)}zz", b"1"),
    "goodput": (goodput_key(S, "a"), b'{"v":1}'),
}
OWN = {goodput_key(S, "a")}  # the agent's own record: starting it from zero is its documented answer


@st.composite
def garbage(draw, record: bytes) -> bytes:
    how = draw(st.sampled_from(["newer", "range", "bytes", "deep", "truncate", "json"]))
    try:
        data = json.loads(record)
    except ValueError:
        data = None
    if how == "newer" and isinstance(data, dict):
        return json.dumps({**data, "v": 2, "new_field": [1, 2]}).encode()
    if how == "range" and isinstance(data, dict):
        field = draw(st.sampled_from(sorted(set(data) - {"v"}) or ["v"]))
        data[field] = draw(st.sampled_from([0, -1, 2**63, 70000, "", None, [], "a\x00b", True]))
        return json.dumps(data).encode()
    if how == "deep":
        return b"[" * 100_000
    if how == "truncate" and len(record) > 1:
        return record[: draw(st.integers(1, len(record) - 1))]
    if how == "json":
        return json.dumps(draw(st.sampled_from([[], 1, "x", None, {"v": "1"}, {"v": 1}]))).encode()
    return draw(st.binary(max_size=30))


class FakeGroup:
    """Workers that run nothing; the test sets their exit codes."""

    def __init__(self, command, envs, log_dir, prefixes, warm) -> None:
        self.envs = envs
        self.codes: list[int | None] = [None] * len(envs)
        self.started = self.stopped = False
        self.pids = [20_000 + i for i in range(len(envs))]

    def start(self) -> None:
        self.started = True

    def poll(self) -> list[int | None]:
        return list(self.codes)

    def terminate(self) -> None:
        self.stopped = True
        self.codes = [-15 if c is None else c for c in self.codes]

    def settled(self) -> bool:
        return None not in self.codes

    def kill(self) -> None:
        self.terminate()

    def stop(self, timeout: float) -> None:
        self.terminate()

    def relabel(self, routes) -> None:
        pass

    def failure_summary(self, local_rank: int) -> str:
        return f"local rank {local_rank} exited with code {self.codes[local_rank]}"

    def stderr_tail(self, local_rank: int, lines: int = 10) -> list[str]:
        return []


class Node:
    """One agent on its own thread; ``outcome`` is its exit code or the exception it raised."""

    def __init__(self, store: MemoryStore, node_id: str, tmp: Path, min_nodes: int) -> None:
        self.groups: list[FakeGroup] = []
        argv = ["--min-nodes", str(min_nodes), "--max-nodes", "2", "--job-id", JOB, "--etcd-endpoints",
                "127.0.0.1:1", "--node-id", node_id, "--node-addr", "127.0.0.1", "--log-dir", str(tmp / node_id),
                "--no-prewarm", "--max-restarts", "3", "--etcd-wait", "2", *TIMINGS, "--", "python", "train.py"]
        self.agent = Agent(load_config(argv, {}), store, environ={"PATH": "/usr/bin"}, group_factory=self._group)
        self.outcome: object = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"fuzz-agent-{node_id}")
        self.thread.start()

    def _group(self, *args) -> FakeGroup:
        self.groups.append(FakeGroup(*args))
        return self.groups[-1]

    def _run(self) -> None:
        try:
            self.outcome = self.agent.run()
        except BaseException as exc:  # noqa: BLE001 - what the test judges
            self.outcome = exc

    @property
    def training(self) -> bool:
        return bool(self.groups) and not self.groups[-1].stopped and self.agent.state == "running"

    def stop(self) -> None:
        self.agent.signals.request("test over")
        self.agent.signals.count = 2
        self.thread.join(10)
        assert not self.thread.is_alive(), "the agent's loop did not end"


def settle(nodes: list[Node], until, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until():
        time.sleep(0.02)


def judge(nodes: list[Node], store: MemoryStore, key: str, value: bytes) -> None:
    for node in nodes:
        outcome = node.outcome
        if isinstance(outcome, BaseException):
            # A typed error, which start logs as one line and turns into exit 1 (or 2).
            assert isinstance(outcome, (RendezvousError, AgentError)), repr(outcome)
            if isinstance(outcome, CorruptStateError):
                assert outcome.key == key and "\n" not in str(outcome), str(outcome)
        else:
            assert outcome in (0, 1, 3), outcome
    kv, _ = store.get(key)
    if key not in OWN:
        assert kv is None or kv.value == value, f"{key} was overwritten: {value[:80]!r} -> {kv.value[:80]!r}"


@pytest.fixture(autouse=True, scope="module")
def _no_snapshot_dirs_left():
    """The agents here never finish their job, so they leave its (empty) snapshot dirs in
    shared memory: removed with the module."""
    yield
    shutil.rmtree(snapshots_of(JOB, Path("/nonexistent")), ignore_errors=True)


@pytest.fixture
def store():
    s = MemoryStore()
    yield s
    s.close()


@st.composite
def written(draw, targets: list[str]) -> tuple[str, bytes]:
    target = draw(st.sampled_from(targets))
    return target, draw(garbage(TARGETS[target][1]))


NEWER_ROUND = json.dumps({**json.loads(TARGETS["round"][1]), "v": 2}).encode()


@FUZZ
@given(case=written(sorted(set(TARGETS) - {"node"})))
@example(case=("round", NEWER_ROUND))
@example(case=("goodput", b"[" * 100_000))
def test_garbage_written_before_start(tmp_path, case) -> None:
    target, value = case
    key, _ = TARGETS[target]
    store = MemoryStore()
    try:
        store.put(key, value)
        node = Node(store, "a", tmp_path, min_nodes=1)
        settle([node], lambda: not node.thread.is_alive() or node.training, 10)
        if node.training:
            node.groups[-1].codes = [0]  # finish the job: the status key is written once, not over
            settle([node], lambda: not node.thread.is_alive(), 3)
        node.stop()
        judge([node], store, key, value)
    finally:
        store.close()


@FUZZ
@given(case=written(["round", "status", "restarts", "presence", "goodput", "join"]))
@example(case=("round", NEWER_ROUND))
def test_garbage_written_while_two_nodes_run_and_one_fails(tmp_path, case) -> None:
    target, value = case
    key, _ = TARGETS[target]
    if target == "presence":
        key = S.presence_key("b")  # the key a watches: b's presence
    if target == "join":
        key = S.joined_key(2, "zz")  # the round the failure opens
    store = MemoryStore()
    nodes = []
    try:
        nodes = [Node(store, "a", tmp_path, min_nodes=2), Node(store, "b", tmp_path, min_nodes=2)]
        settle(nodes, lambda: all(n.training for n in nodes), 10)
        assert all(n.training for n in nodes), [n.outcome for n in nodes]
        store.put(key, value)
        nodes[0].groups[-1].codes = [1]  # a fails: the next round reads restarts, joins, the round
        # Until both run again, or one stopped (the other then waits for a second node for good).
        settle(nodes, lambda: any(not n.thread.is_alive() for n in nodes)
               or all(n.training and len(n.groups) > 1 for n in nodes), 4)
        for node in nodes:
            node.stop()
        judge(nodes, store, key, value)
    finally:
        for node in nodes:
            node.stop()
        store.close()


def test_garbage_in_the_agents_own_node_key_is_a_named_error_not_a_takeover(tmp_path, store) -> None:
    key, value = S.node_key("a"), b"\xff garbage"
    store.put(key, value)
    node = Node(store, "a", tmp_path, min_nodes=1)
    node.thread.join(10)
    node.stop()
    assert isinstance(node.outcome, RendezvousError) and "'a'" in str(node.outcome), repr(node.outcome)
    assert store.get(key)[0].value == value
