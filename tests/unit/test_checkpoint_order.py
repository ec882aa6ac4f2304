"""Many hosts, one filesystem: (round, step) order, the fence file, and the choice made once.

No torch and no processes: ``choice.load_agreed`` runs rank 0 and rank 1 one after the other
with a fake collective that hands rank 1 what rank 0 broadcast.
"""

from __future__ import annotations

import builtins
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from agent.worker import checkpoint as ckpt
from agent.worker import choice
from agent.worker.checkpoint import CheckpointError, StaleCheckpointError
from agent.worker.choice import CheckpointNotSharedError
from agent.worker.manifest import FENCE_FILE, raise_fence, read_fence

LOGGER = "agent.worker.checkpoint"


def save(directory: Path, step: int, round_number: int | None, data: bytes = b"") -> ckpt.Checkpoint:
    return ckpt.save(directory, step, {"state.pt": data or f"step {step} round {round_number}".encode()},
                     round_number=round_number, now=lambda: 1000.0 + step)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------------------------------
# (round, step) order


@pytest.mark.parametrize(
    ("saves", "oldest_first"),
    [
        ([(1, 1), (3, 1), (2, 1)], [1, 2, 3]),                   # one round: by step
        ([(40, 2), (50, 2), (41, 3)], [40, 50, 41]),             # a fenced round-2 worker saved 50 late
        ([(1, 5), (3, 6), (2, 7)], [1, 3, 2]),                   # the newest round wins, whatever its step
        ([(5, None), (3, 1)], [5, 3]),                            # no round sorts below any round
        ([(2, None), (1, None), (7, None)], [1, 2, 7]),          # plain torchrun: by step, as before
        ([(9, None), (4, 0), (8, 0)], [9, 4, 8]),                # round 0 is a round
    ],
)
def test_latest_is_the_newest_round_then_the_highest_step(tmp_path: Path, saves, oldest_first) -> None:
    for step, round_number in saves:
        save(tmp_path, step, round_number)
    assert [c.step for c in ckpt.complete_checkpoints(tmp_path)] == oldest_first
    assert ckpt.latest_step(tmp_path) == oldest_first[-1]
    assert ckpt.load_latest(tmp_path).step == oldest_first[-1]
    assert choice.choose(tmp_path, ["state.pt"]).checkpoint.step == oldest_first[-1]


@pytest.mark.parametrize(
    ("saves", "n", "deleted", "left"),
    [
        ([(40, 2), (50, 2), (41, 3)], 1, [40, 50], [41]),         # the late round-2 save goes, not round 3's
        ([(40, 2), (50, 2), (41, 3), (42, 3)], 2, [40, 50], [41, 42]),
        ([(40, 2), (50, 2), (41, 3)], 2, [40], [50, 41]),
        ([(5, None), (3, 1), (4, 1)], 1, [5, 3], [4]),
    ],
)
def test_keep_last_keeps_the_newest_by_round_then_step(tmp_path: Path, saves, n, deleted, left) -> None:
    for step, round_number in saves:
        save(tmp_path, step, round_number)
    assert ckpt.keep_last(tmp_path, n) == deleted
    assert [c.step for c in ckpt.complete_checkpoints(tmp_path)] == left


def test_keep_last_one_keeps_each_new_checkpoint_of_the_running_round(tmp_path: Path) -> None:
    save(tmp_path, 50, 2)  # a round-2 worker's save in its grace period, before round 3 fenced
    for step in (41, 42, 43):
        save(tmp_path, step, 3)
        ckpt.keep_last(tmp_path, 1)
        assert [c.step for c in ckpt.complete_checkpoints(tmp_path)] == [step]


def test_keep_last_removes_leftovers_only_below_every_kept_step(tmp_path: Path) -> None:
    save(tmp_path, 20, 2)
    save(tmp_path, 50, 2)
    save(tmp_path, 30, 3)
    save(tmp_path, 31, 3)
    (tmp_path / "step_000000000010").mkdir()                      # orphan below 30: goes
    (tmp_path / "step_000000000035").mkdir()                      # orphan above 30: may be a save, stays
    (tmp_path / "step_000000000012.manifest.json").write_text("{")  # bad manifest below 30: goes
    (tmp_path / ".tmp-step_000000000029-1-ab").mkdir()           # temporaries: below goes, above stays
    (tmp_path / ".tmp-step_000000000060-1-ab").mkdir()
    assert ckpt.keep_last(tmp_path, 2) == [20, 50]
    assert names(tmp_path) == [
        ".tmp-step_000000000060-1-ab",
        "step_000000000030", "step_000000000030.manifest.json",
        "step_000000000031", "step_000000000031.manifest.json",
        "step_000000000035",
    ]


# ---------------------------------------------------------------------------------------------
# The fence file


@pytest.mark.parametrize(
    ("raises", "fences"),
    [
        ([3], [3]),
        ([3, 2], [3, 3]),          # never lowered
        ([3, 3, 5], [3, 3, 5]),
        ([0, 1], [0, 1]),
    ],
)
def test_the_fence_only_goes_up(tmp_path: Path, raises, fences) -> None:
    assert read_fence(tmp_path) is None
    for round_number, fence in zip(raises, fences):
        assert raise_fence(tmp_path, round_number) == fence
        assert read_fence(tmp_path) == fence
    assert json.loads((tmp_path / FENCE_FILE).read_text()) == {"v": 1, "round": fences[-1]}
    assert names(tmp_path) == [FENCE_FILE]  # no temporaries left


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[3]", b'{"round": 3}', b'{"v": 2, "round": 3}', b'{"v": 1, "round": "3"}',
     b'{"v": 1, "round": true}', b'{"v": 1}', b"\xff\xfe"],
)
def test_a_garbage_fence_warns_and_is_ignored(tmp_path: Path, caplog, content: bytes) -> None:
    fence = tmp_path / FENCE_FILE
    fence.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert read_fence(tmp_path) is None
        save(tmp_path, 1, 1)  # ignored: nothing fences round 1
    assert str(fence) in caplog.text and "ignored" in caplog.text
    assert raise_fence(tmp_path, 2) == 2  # the next raise replaces it
    assert read_fence(tmp_path) == 2


def test_a_fenced_round_cannot_save_even_a_higher_step(tmp_path: Path) -> None:
    save(tmp_path, 40, 2)
    found = choice.load_agreed(tmp_path, 3, rank=0, names=["state.pt"], deserialize=lambda loaded: loaded.payload)
    assert found is not None and found[0].step == 40 and read_fence(tmp_path) == 3
    before = names(tmp_path)
    with pytest.raises(StaleCheckpointError) as caught:
        save(tmp_path, 50, 2)  # the round-2 worker, fenced off by the agent, saves in its grace period
    assert (caught.value.round_number, caught.value.newer_round, caught.value.newer_step) == (2, 3, None)
    assert "round 2" in str(caught.value) and "fence file says round 3" in str(caught.value)
    assert names(tmp_path) == before
    save(tmp_path, 41, 3)
    save(tmp_path, 42, None)  # plain torchrun is never fenced
    assert ckpt.latest_step(tmp_path) == 41


def test_a_save_is_checked_against_the_fence_again_just_before_its_commit(tmp_path: Path) -> None:
    save(tmp_path, 40, 2)

    def slow_writer(handle) -> None:
        handle.write(b"late")
        raise_fence(tmp_path, 3)  # round 3 chose while this save was writing

    with pytest.raises(StaleCheckpointError, match="fence file says round 3"):
        ckpt.save(tmp_path, 50, {"state.pt": slow_writer}, round_number=2)
    assert names(tmp_path) == [FENCE_FILE, "step_000000000040", "step_000000000040.manifest.json"]


# ---------------------------------------------------------------------------------------------
# The choice made once


class Leader:
    """Rank 0's side of the fake collective: records what it broadcast."""

    def __init__(self, others_failed: bool = False) -> None:
        self.sent: list[Any] = []
        self.others_failed = others_failed

    def broadcast(self, obj: Any) -> Any:
        self.sent.append(obj)
        return obj

    def agree(self, flag: bool) -> bool:
        return flag or self.others_failed


class Follower:
    def __init__(self, message: Any) -> None:
        self.message = message

    def broadcast(self, obj: Any) -> Any:
        assert obj is None
        return self.message

    def agree(self, flag: bool) -> bool:
        return flag


def load(directory: Path | None, rank: int, collective, round_number: int | None = 4):
    return choice.load_agreed(directory, round_number, rank=rank, names=["state.pt"],
                              deserialize=lambda loaded: loaded.payload["state.pt"], collective=collective)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    paths: list[str] = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        paths.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    return paths


def test_every_rank_loads_rank_0s_choice_reading_each_file_once(tmp_path: Path, opened: list[str]) -> None:
    save(tmp_path, 2, 3, data=b"two")
    state = str(tmp_path / "step_000000000002" / "state.pt")
    leader = Leader()
    checkpoint, data = load(tmp_path, 0, leader)
    assert (checkpoint.step, data) == (2, b"two") and opened.count(state) == 1
    assert leader.sent == [{"v": 1, "step": 2, "round": 3, "sha256": {"state.pt": checkpoint.files["state.pt"].sha256}}]

    save(tmp_path, 6, 4, data=b"six")  # committed after rank 0 announced, before rank 1 loads
    opened.clear()
    checkpoint, data = load(tmp_path, 1, Follower(leader.sent[0]))
    assert (checkpoint.step, data) == (2, b"two") and opened.count(state) == 1
    assert not any("step_000000000006" in p for p in opened)  # rank 1 never looked for the latest itself


def test_no_checkpoint_is_a_choice_too(tmp_path: Path) -> None:
    leader = Leader()
    assert load(tmp_path, 0, leader) is None
    assert leader.sent == [{"v": 1, "step": None}]
    save(tmp_path, 3, 4)  # committed late: rank 1 still starts from scratch with the others
    assert load(tmp_path, 1, Follower(leader.sent[0])) is None
    assert read_fence(tmp_path) == 4


def test_rank_0_skips_a_corrupt_newest_and_rank_1_follows(tmp_path: Path, caplog) -> None:
    save(tmp_path, 1, 4, data=b"good")
    bad = save(tmp_path, 2, 4, data=b"good").file("state.pt")
    bad.write_bytes(b"evil")  # same size: only the hash of the bytes read can tell
    leader = Leader()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert load(tmp_path, 0, leader)[0].step == 1
    assert str(bad) in caplog.text and "sha256" in caplog.text
    assert load(tmp_path, 1, Follower(leader.sent[0]))[0].step == 1


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda d: (d / "step_000000000002.manifest.json").unlink(), "cannot be read"),
        (lambda d: (d / "step_000000000002" / "state.pt").write_bytes(b"x"), "has 1 bytes"),
        (lambda d: save(d, 2, 4, data=b"another"), "describes another checkpoint"),
    ],
    ids=["manifest missing", "file truncated", "re-saved since"],
)
def test_a_rank_that_cannot_find_the_choice_says_the_directory_must_be_shared(tmp_path: Path, damage,
                                                                              expected) -> None:
    save(tmp_path, 2, 4, data=b"chosen")
    leader = Leader()
    load(tmp_path, 0, leader)
    damage(tmp_path)
    with pytest.raises(CheckpointNotSharedError) as caught:
        load(tmp_path, 1, Follower(leader.sent[0]))
    text = str(caught.value)
    assert "rank 1 cannot load the checkpoint rank 0 chose (step 2, round 4)" in text and expected in text
    assert str(tmp_path) in text and "must be shared by every node" in text


def test_a_rank_without_a_directory_cannot_follow(tmp_path: Path) -> None:
    save(tmp_path, 2, 4)
    leader = Leader()
    load(tmp_path, 0, leader)
    with pytest.raises(CheckpointNotSharedError, match="this rank has no checkpoint directory"):
        load(None, 1, Follower(leader.sent[0]))


def test_a_failure_anywhere_fails_every_rank(tmp_path: Path) -> None:
    save(tmp_path, 2, 4)
    # Rank 0 fails: it broadcasts the error instead of a choice, raises its own, rank 1 raises too.
    leader = Leader()
    with pytest.raises(ZeroDivisionError):
        choice.load_agreed(tmp_path, 4, rank=0, names=["state.pt"], deserialize=lambda loaded: 1 / 0,
                           collective=leader)
    leader = Leader()
    with pytest.raises(CheckpointError, match="has no file 'model.pt'"):
        choice.load_agreed(tmp_path, 4, rank=0, names=["model.pt"], deserialize=bytes, collective=leader)
    assert "has no file 'model.pt'" in leader.sent[0]["error"]
    with pytest.raises(CheckpointError, match="rank 1: rank 0 could not choose a checkpoint: CheckpointError"):
        load(tmp_path, 1, Follower(leader.sent[0]))
    # Another rank failed after the choice: rank 0 does not go on alone.
    with pytest.raises(CheckpointError, match="rank 0: another rank could not load the checkpoint"):
        load(tmp_path, 0, Leader(others_failed=True))
    with pytest.raises(CheckpointError, match=r"announced \{'v': 9\}"):
        load(tmp_path, 1, Follower({"v": 9}))


def test_a_fence_that_cannot_be_written_is_a_warning(tmp_path: Path, caplog, monkeypatch) -> None:
    save(tmp_path, 2, 4)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(choice, "raise_fence", read_only)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert load(tmp_path, 0, None, round_number=5)[0].step == 2
    assert "cannot record round 5 in the fence file" in caplog.text and str(tmp_path) in caplog.text


def test_plain_torchrun_writes_no_fence(tmp_path: Path) -> None:
    save(tmp_path, 2, None)
    assert load(tmp_path, 0, Leader(), round_number=None)[0].step == 2
    assert read_fence(tmp_path) is None and not (tmp_path / FENCE_FILE).exists()
