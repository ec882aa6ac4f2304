"""``elastic-agent status`` from a MemoryStore holding a job's keys: the snapshot and its text."""

from __future__ import annotations

import pytest

from agent.errors import ConfigError
from agent.observe.goodput import BADPUT_REASONS, NodeReport, Totals, persist
from agent.observe.status import render, snapshot
from rendezvous.errors import CorruptStateError
from rendezvous.memory_store import MemoryStore
from rendezvous.settings import Settings
from rendezvous.state import Assignment, JobStatus, Member, NodeRecord, RestartCount, RoundState

NOW = 1_700_000_000.0
S = Settings(job_id="llama", min_nodes=2, max_nodes=3)


def job(store: MemoryStore, *, round_open: bool = False) -> None:
    lease = store.grant(30)
    for node, addr in (("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")):
        store.put(S.node_key(node), NodeRecord(node, addr, 8).encode(), lease=lease)
    members = (Member("b", "10.0.0.2", 8), Member("a", "10.0.0.1", 8), Member("gone", "10.0.0.9", 8))
    if round_open:
        rnd = RoundState(8, "open", "node_lost: gone")
        store.put(S.members_key(7), RoundState(7, "closed", assignment=Assignment(7, members, "h", 1)).encode_members())
    else:
        rnd = RoundState(7, "closed", "worker_failure: a rank 3 exited 1",
                         assignment=Assignment(7, members, "10.0.0.2", 29500))
    store.put(S.round_key, rnd.encode())
    if rnd.assignment is not None:
        store.put(S.members_key(rnd.number), rnd.encode_members())
    store.put(S.restarts_key, RestartCount(2, "worker_failure: a rank 3 exited 1").encode())
    badput = {r: 0.0 for r in BADPUT_REASONS} | {"rendezvous": 60.0, "lost_progress": 40.0}
    for node, age, step in (("a", 10, 1200), ("b", 40, 1199)):
        persist(store, S, node, NodeReport(
            node, Totals(1000.0, 900.0, badput, step), state="running", last_step=step,
            last_step_time=NOW - age, checkpoint_step=1100, checkpoint_time=NOW - 300,
            max_restarts=5, time=NOW - age))


def test_snapshot_of_a_running_job() -> None:
    store = MemoryStore(reap_interval=None)
    job(store)
    snap = snapshot(store, "llama", now=NOW)
    assert snap["state"] == "running" and snap["round"] == 7
    assert [(m["node_id"], m["group_rank"], m["alive"]) for m in snap["members"]] == [
        ("b", 0, True), ("a", 1, True), ("gone", 2, False)]
    assert snap["members"][1]["last_report_age_seconds"] == 10
    assert snap["members"][2]["agent_state"] is None
    assert [s["node_id"] for s in snap["standbys"]] == ["c"]
    assert (snap["world_size_nodes"], snap["world_size"]) == (3, 24)
    assert (snap["restarts_used"], snap["max_restarts"], snap["restarts_left"]) == (2, 5, 3)
    assert (snap["last_step"], snap["last_step_age_seconds"]) == (1200, 10)
    assert (snap["checkpoint_step"], snap["checkpoint_age_seconds"]) == (1100, 300)
    assert snap["goodput_ratio"] == 0.9
    assert snap["badput_node_seconds"]["lost_progress"] == 80


def test_render_for_a_person() -> None:
    store = MemoryStore(reap_interval=None)
    job(store)
    out = render(snapshot(store, "llama", now=NOW))
    lines = out.splitlines()
    assert lines[0] == "job llama: running, round 7 closed (worker_failure: a rank 3 exited 1)"
    assert lines[1] == "world size: 3 nodes, 24 workers"
    assert lines[2].split() == ["rank", "0", "b", "10.0.0.2", "nproc", "8", "alive", "running", "report", "40s", "ago"]
    assert "LOST" in lines[4] and "gone" in lines[4]
    assert "standbys / waiting: c (registered)" in out
    assert "restarts: 2 of 5 used (last: worker_failure: a rank 3 exited 1)" in out
    assert "last step: 1200 (10s ago)   last checkpoint: 1100 (5m ago)" in out
    assert "goodput: 90.0% of 2000 node-seconds (badput: rendezvous 120s, lost_progress 80s)" in out


def test_an_open_round_shows_who_was_in_the_last_one() -> None:
    store = MemoryStore(reap_interval=None)
    job(store, round_open=True)
    snap = snapshot(store, "llama", now=NOW)
    assert snap["state"] == "rendezvous" and snap["members"] == []
    assert snap["previous_members"] == ["b", "a", "gone"]
    assert "previous members: b, a, gone" in render(snap)


def test_finished_job() -> None:
    store = MemoryStore(reap_interval=None)
    job(store)
    store.put(S.status_key, JobStatus("failed", "restart budget spent (5 of 5 used)").encode())
    snap = snapshot(store, "llama", now=NOW)
    assert snap["state"] == "failed"
    assert render(snap).splitlines()[0] == "job llama: failed (restart budget spent (5 of 5 used))"


def test_a_job_without_agent_records_says_what_it_cannot_know() -> None:
    store = MemoryStore(reap_interval=None)
    store.put(S.round_key, RoundState(1, "open").encode())
    out = render(snapshot(store, "llama", now=NOW))
    assert "restarts: 0 used (budget unknown: no agent reported it)" in out
    assert "last step: -   last checkpoint: -" in out


def test_unknown_job_and_bad_job_id_are_usage_errors() -> None:
    store = MemoryStore(reap_interval=None)
    with pytest.raises(ConfigError, match=r"--job-id \('nope'\): no such job in etcd"):
        snapshot(store, "nope")
    with pytest.raises(ConfigError, match=r"--job-id \('a/b'\)"):
        snapshot(store, "a/b")


def test_corrupt_round_is_named() -> None:
    store = MemoryStore(reap_interval=None)
    store.put(S.round_key, b"garbage")
    with pytest.raises(CorruptStateError, match="/elastic-agent/llama/round"):
        snapshot(store, "llama")


def test_status_shows_who_cannot_reach_whom_and_who_is_kept_out() -> None:
    from rendezvous.protocol.reachability import Report  # noqa: PLC0415

    store = MemoryStore(reap_interval=None)
    job(store)
    store.put(S.reach_prefix + "a", Report(7, ("gone",)).encode())
    store.put(S.reach_prefix + "c", Report(7, ("a", "b"), kept_out=True).encode())
    store.put(S.reach_prefix + "x", b"\x1b[2J not a report")  # unreadable: not shown, no error
    snap = snapshot(store, "llama", now=NOW)
    assert snap["network"] == [
        {"node_id": "a", "round": 7, "unreachable": ["gone"], "kept_out": False},
        {"node_id": "c", "round": 7, "unreachable": ["a", "b"], "kept_out": True}]
    text = render(snap)
    assert "network: a cannot reach gone (round 7)" in text
    assert "network: c kept out (unreachable): cannot reach a, b" in text
