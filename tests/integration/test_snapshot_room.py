"""Snapshots never fill /dev/shm (agent.worker.snapshot): a node that cannot hold its own copy,
its peer's and a temporary file turns snapshots off, says so once and leaves a signal for the
agent; a write that fails leaves no temporary file. Real files."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from agent.worker.snapshot import OFF_FILE, SnapshotDir, Snapshots

DEADLINE_S = 30.0


def state() -> dict:
    return {"model": {"w": torch.zeros(1000)}, "optimizer": {}, "step": 0}


def test_a_node_without_room_for_three_copies_turns_snapshots_off_once_and_says_so(tmp_path, monkeypatch, caplog):
    store = SnapshotDir(tmp_path, "j")
    monkeypatch.setattr(SnapshotDir, "room", lambda self: 5000)  # a 4 KB state needs 3 x that
    snaps = Snapshots(store, 1, "a", 0)
    with caplog.at_level(logging.WARNING):
        assert snaps.after_step(0, 1, state()) and snaps.wait_idle(DEADLINE_S)
        assert not snaps.after_step(1, 1, state())  # off: no more are taken
    assert snaps.written == -1 and snaps.off is not None
    assert [p.name for p in tmp_path.iterdir()] == [OFF_FILE]  # nothing written but the signal
    assert "bytes free" in json.loads((tmp_path / OFF_FILE).read_text())["why"]
    warnings = [r for r in caplog.records if "snapshots are off" in r.getMessage()]
    assert len(warnings) == 1


def test_a_node_with_room_keeps_its_snapshots(tmp_path):
    snaps = Snapshots(SnapshotDir(tmp_path, "j"), 1, "a", 0)
    assert snaps.after_step(0, 1, state()) and snaps.wait_idle(DEADLINE_S)
    assert snaps.written == 0 and snaps.off is None and (tmp_path / "own-0").is_file()


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    store = SnapshotDir(tmp_path, "j")
    real_replace = os.replace

    def full(src, dst):  # the rename fails as a full /dev/shm would fail the write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        store.write("own-0", {"step": 1, "round": 1}, b"x" * 100)
    monkeypatch.setattr(os, "replace", real_replace)
    assert list(tmp_path.iterdir()) == []


def test_the_receiver_refuses_a_snapshot_larger_than_its_room(tmp_path, monkeypatch):
    from agent.worker import snapshot_wire as wire
    key = b"k" * 64
    there = Snapshots(SnapshotDir(tmp_path / "b", "j"), 1, "b", 0, key=key)
    there.serve("127.0.0.1")
    monkeypatch.setattr(SnapshotDir, "room", lambda self: 100)
    with pytest.raises(OSError):
        wire.push(there.address, {"node": "a", "local_rank": 0, "round": 1, "step": 0}, b"x" * 1000, job="j", key=key)
    assert there.server.stored == 0 and not (tmp_path / "b" / "peer-a-0").exists()
    there.server.close()
