"""Rank files of sharded snapshots (agent.worker.shard_store): twins, ranks whose files hold the
same pieces (HSDP replicas), stand for each other in the choice of a snapshot; a file's header
is read however long its index."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agent.worker import shard_store as store

JOB = "j"


def test_ranks_of_one_layout_share_a_class_numbered_in_rank_order() -> None:
    # a 2 x 2 HSDP mesh: ranks 0 and 2 hold shard 0, ranks 1 and 3 shard 1
    assert store.classes(["a", "b", "a", "b"]) == [0, 1, 0, 1]
    assert store.classes(["x", "y", "z"]) == [0, 1, 2]  # FSDP: every rank its own


@pytest.mark.parametrize("held,whole", [
    ({(0, 2), (1, 2)}, True),  # one file of each class: the replicas of the lost node are not needed
    ({(0, 2)}, False),  # a class nobody holds: that shard is in nobody's memory
    ({(0, 4), (1, 4), (3, 4)}, False),  # FSDP with rank 2's file gone
    ({(0, 2), (1, 3)}, False),  # files that disagree on the classes: never mixed
])
def test_a_snapshot_is_whole_when_every_class_has_a_file(held: set[tuple[int, int]], whole: bool) -> None:
    assert store.every_class(held) is whole


def test_a_file_keeps_its_twins_and_one_without_them_is_its_own_class() -> None:
    key = (3, 7, 2, 4)
    entries = {"w": (torch.arange(4.0), (8,), (4,))}
    head, _ = store.parse_head(store.packed(JOB, key, entries), JOB, key)
    assert store.twins_of(head) == (2, 4)
    head, _ = store.parse_head(store.pack(JOB, key, entries, (0, 2))[0], JOB, key)
    assert store.twins_of(head) == (0, 2)


@pytest.mark.parametrize("twins", [(2, 2), (0, 5), (-1, 2)])
def test_a_file_claiming_impossible_twins_is_refused(twins: tuple[int, int]) -> None:
    key = (3, 7, 2, 4)
    head = store.pack(JOB, key, {"w": (torch.arange(4.0), (8,), (4,))}, twins)[0]
    with pytest.raises(store.ShardError, match="not this job's file"):
        store.parse_head(head, JOB, key)


def test_a_header_longer_than_the_first_mib_is_read_and_its_pieces_served(tmp_path: Path) -> None:
    key = (1, 4, 0, 2)
    entries = {f"optimizer.param_groups.{i}.a_long_name_for_a_value": i for i in range(40_000)}
    entries["w"] = (torch.arange(6.0), (12,), (0,))
    head, parts = store.pack(JOB, key, entries)
    assert len(head) > store.BLOCK
    files = store.ShardDir(tmp_path, JOB)
    files.write(key, head, *parts)
    assert files.listing(round_number=2) == [[*key, len(head) + 24, 0, 2, 0]]  # 0: its values are its own
    assert bytes(files.read(key, len(head) + 8, 8)) == torch.tensor([2.0, 3.0]).numpy().tobytes()


HSDP = (["a:1", "a:2", "b:1", "b:2"], [0, 1, 0, 1])  # 2 nodes x 2 ranks, a replica per node
FSDP = (["a:1", "a:2", "b:1", "b:2"], [0, 1, 2, 3])


@pytest.mark.parametrize("asked,mesh,every,peer,sync", [
    (None, HSDP, 10, None, False),  # its twin on the next node holds the same pieces, live: every 10th step
    (None, FSDP, 1, "b:1", True),  # its pieces exist only here and in the pushed copy: every step, waited for
    (None, ([None] * 4, [0, 1, 2, 3]), 1, None, False),  # no snapshot key, no addresses: nothing to push to
    (None, (["a:1", "a:2"], [0, 0]), 1, None, False),  # one node: the replicas go down together
    (3, HSDP, 3, None, False),  # a cadence the script sets is obeyed
    (1, HSDP, 1, None, False),
    (3, FSDP, 3, "b:1", False),  # a sparser cadence: pushed behind the next step, the step in flight at risk
    (1, FSDP, 1, "b:1", True),
])
def test_the_default_cadence_is_every_10th_step_only_where_a_twin_lives_on_the_next_node(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, asked: int | None, mesh: tuple, every: int,
        peer: str | None, sync: bool) -> None:
    from agent.worker import sharded_memory

    monkeypatch.setattr(sharded_memory.dist, "get_rank", lambda: 0)
    memory = sharded_memory.ShardedMemory(tmp_path, JOB, asked, None, node="a", local_rank=0, local_world=2,
                                          round_number=1)
    memory._pick_peer(*mesh)
    assert (memory.every, memory.peer, memory.sync) == (every, peer, sync)


def test_a_steps_values_kept_apart_are_kept_for_the_last_two_steps_and_dropped_with_their_files(
        tmp_path: Path) -> None:
    files = store.ShardDir(tmp_path, JOB)
    for step in (3, 4, 5):
        files.write_rest((2, step), store.packed(JOB, (2, step, 0, 1), {"lr": 0.1 * step}))
    assert sorted(files.rests()) == [(2, 4), (2, 5)]
    assert files.read_rest((2, 3)) is None
    files.drop_older((2, 5))
    assert files.rests() == [(2, 5)] and files.read_rest((2, 5)).startswith(store.MAGIC)
