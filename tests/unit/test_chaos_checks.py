"""The checks `make chaos` runs after each scenario (tests/chaos/history.py, invariants.py,
evidence.py) can fail: fed a history, a timeline or a checkpoint directory that breaks an
invariant, each says so. Pure: no etcd, no processes."""

from __future__ import annotations

from pathlib import Path

from rendezvous.settings import Settings
from rendezvous.state import Assignment, JobStatus, Member, Outcome, RoundPhase, RoundState
from rendezvous.store import DELETE, PUT, Event
from tests.chaos import history, invariants
from tests.chaos.evidence import CheckpointWatcher, Claim, Resume, Seen, Step, Timeline, downtime, lost_steps

SETTINGS = Settings("job", 2, 4)


def closed(number: int, *nodes: str) -> RoundState:
    members = tuple(Member(n, "10.0.0.1", 1) for n in nodes)
    return RoundState(number, RoundPhase.CLOSED, assignment=Assignment(number, members, "10.0.0.1", 29500))


def put(rev: int, key: str, value: bytes) -> Event:
    return Event(PUT, key, value, 1, rev)


def rounds(*states: RoundState) -> list[Event]:
    """The round records, each closed one with its members written in the same revision."""
    events = []
    for i, s in enumerate(states):
        events.append(put(i + 1, SETTINGS.round_key, s.encode()))
        if s.assignment is not None:
            events.append(put(i + 1, SETTINGS.members_key(s.number), s.encode_members()))
    return events


def test_a_clean_history_has_no_violation():
    opened = RoundState(2, RoundPhase.OPEN)
    got = history.check(rounds(closed(1, "a", "b"), opened, closed(2, "b", "a")), SETTINGS)
    assert got.violations == [] and got.assignments == {1: (("a", 1), ("b", 1)), 2: (("b", 1), ("a", 1))}


def test_two_assignments_for_one_round_a_node_twice_and_a_round_going_back_are_named():
    events = rounds(closed(1, "a", "b"), closed(1, "a", "c"), closed(2, "a", "a"), closed(3, "a", "b"),
                    closed(1, "a", "b"))
    found = history.check(events, SETTINGS).violations
    assert any("round 1 has two assignments" in v for v in found), found
    assert any("revision 3" in v and "each node once" in v for v in found), found  # the record's own check
    assert any("round went back from 3 to 1" in v for v in found), found


def test_a_deleted_round_key_a_second_outcome_and_garbage_are_named():
    status = JobStatus(Outcome.SUCCEEDED, "done").encode()
    events = [Event(DELETE, SETTINGS.round_key, b"", 0, 1), put(2, SETTINGS.status_key, status),
              put(3, SETTINGS.status_key, status), put(4, SETTINGS.round_key, b"{not json")]
    found = history.check(events, SETTINGS).violations
    assert len(found) == 3 and "deleted" in found[0] and "written twice" in found[1], found


def test_an_agent_running_a_rank_etcd_gave_another_node_is_named():
    hist = history.check(rounds(closed(1, "a", "b")), SETTINGS)
    tl = Timeline([Claim(1.0, "a", 1, 0, 2), Claim(1.0, "c", 1, 0, 2), Claim(2.0, "b", 3, 0, 2)], [], [])
    found = invariants.ranks_as_assigned(tl, hist)
    assert any("c ran round 1 as group rank 0" in v for v in found), found
    assert any("given to ['a', 'c']" in v for v in found), found
    assert any("etcd never closed" in v for v in found), found


def test_a_resume_from_a_zombie_save_is_named(tmp_path: Path):
    # Round 2 trains from t=10; round 1's step-19 checkpoint was written at t=12, and loaded at t=20.
    tl = Timeline([], [Step(10.0, 15, 2, 2, "b"), Step(11.0, 16, 2, 2, "b")], [Resume(20.0, 20, 3, "b")])
    watcher = CheckpointWatcher(tmp_path)
    watcher.seen.append(Seen(12.0, 19, 1, 1))
    assert any("written after round 2 had started training" in v for v in invariants.no_stale_loads(tl, watcher))
    watcher.seen[0] = Seen(9.0, 19, 1, 1)  # written before round 2 trained: a fine checkpoint
    assert invariants.no_stale_loads(tl, watcher) == []


def test_a_truncated_checkpoint_is_named(tmp_path: Path):
    import torch

    from agent.worker.checkpoint import save

    save(tmp_path, 9, {invariants.STATE_FILE: lambda f: torch.save({"w": torch.ones(4)}, f)}, round_number=1)
    assert invariants.checkpoints_complete(tmp_path)[0] == []
    state = next(tmp_path.glob("step_*/" + invariants.STATE_FILE))
    state.write_bytes(state.read_bytes()[:10])
    bad, summary = invariants.checkpoints_complete(tmp_path)
    assert len(bad) == 1 and "inv 4" in bad[0] and "1 of 1 checkpoints bad" in summary, (bad, summary)


def test_downtime_and_lost_steps():
    steps = [Step(t, s, 3, 1, "a") for t, s in ((1.0, 10), (2.0, 11), (9.0, 8), (10.0, 9))]
    tl = Timeline([], steps, [Resume(8.5, 8, 2, "a")])
    assert downtime(tl, 1.5, 11.0) == 7.0
    assert lost_steps(tl, 0.0) == 4  # steps 8-11 trained again
