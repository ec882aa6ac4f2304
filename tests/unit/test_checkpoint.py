"""agent.checkpoint: atomic save, latest complete checkpoint, corruption skipped, retention, fencing."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from agent.worker import checkpoint as ckpt
from agent.worker.checkpoint import CheckpointError, StaleCheckpointError


def save(directory: Path, step: int, data: bytes = b"", round_number: int | None = 1) -> ckpt.Checkpoint:
    return ckpt.save(directory, step, {"state.pt": data or f"state of step {step}".encode()},
                     round_number=round_number, now=lambda: 1000.0 + step)


def test_save_writes_payload_and_manifest(tmp_path: Path) -> None:
    written = ckpt.save(tmp_path, 7, {"a.bin": b"abc", "b.bin": lambda f: f.write(b"xyz!")},
                        round_number=3, now=lambda: 1234.5)
    assert written.path == tmp_path / "step_000000000007"
    assert (written.path / "a.bin").read_bytes() == b"abc"
    assert (written.path / "b.bin").read_bytes() == b"xyz!"
    manifest = json.loads((tmp_path / "step_000000000007.manifest.json").read_text())
    assert manifest == {
        "v": 1, "step": 7, "round": 3, "time": 1234.5,
        "files": {
            "a.bin": {"size": 3, "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
            "b.bin": {"size": 4, "sha256": written.files["b.bin"].sha256},
        },
    }
    # No temporaries left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000000007", "step_000000000007.manifest.json"]


def test_load_latest_returns_highest_complete_step(tmp_path: Path) -> None:
    assert ckpt.load_latest(tmp_path) is None
    assert ckpt.load_latest(tmp_path / "missing") is None
    assert ckpt.latest_step(tmp_path) is None
    for step in (3, 10, 4):
        save(tmp_path, step)
    latest = ckpt.load_latest(tmp_path)
    assert latest is not None
    assert (latest.step, latest.round_number, latest.time) == (10, 1, 1010.0)
    assert latest.file("state.pt").read_bytes() == b"state of step 10"
    assert ckpt.latest_step(tmp_path) == 10
    assert [c.step for c in ckpt.complete_checkpoints(tmp_path)] == [3, 4, 10]


def test_truncated_newest_is_skipped_with_a_warning_naming_the_file(tmp_path: Path, caplog) -> None:
    save(tmp_path, 1)
    newest = save(tmp_path, 2, data=b"x" * 1000)
    state = newest.file("state.pt")
    state.write_bytes(b"x" * 10)  # a torn write
    with caplog.at_level(logging.WARNING, logger="agent.worker.checkpoint"):
        latest = ckpt.load_latest(tmp_path)
    assert latest is not None and latest.step == 1
    assert str(state) in caplog.text
    assert "10 bytes" in caplog.text and "1000" in caplog.text
    assert ckpt.latest_step(tmp_path, check_hashes=False) == 1


def test_same_size_corruption_is_caught_by_sha256(tmp_path: Path, caplog) -> None:
    save(tmp_path, 1)
    newest = save(tmp_path, 2, data=b"good data")
    newest.file("state.pt").write_bytes(b"evil data")
    with caplog.at_level(logging.WARNING, logger="agent.worker.checkpoint"):
        assert ckpt.latest_step(tmp_path) == 1
    assert "sha256" in caplog.text and str(newest.file("state.pt")) in caplog.text
    # A sizes-only check cannot see it: documented trade-off.
    assert ckpt.latest_step(tmp_path, check_hashes=False) == 2


def test_missing_payload_file_is_skipped(tmp_path: Path, caplog) -> None:
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    newest.file("state.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="agent.worker.checkpoint"):
        assert ckpt.latest_step(tmp_path) == 1
    assert "missing" in caplog.text and str(newest.path / "state.pt") in caplog.text


def test_payload_without_manifest_is_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    save(tmp_path, 1)
    save(tmp_path, 2)
    (tmp_path / "step_000000000002.manifest.json").unlink()  # crash before the commit point
    with caplog.at_level(logging.WARNING, logger="agent.worker.checkpoint"):
        assert ckpt.latest_step(tmp_path) == 1
    assert "step_000000000002" in caplog.text and "no manifest" in caplog.text


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "must hold a JSON object"),
        (json.dumps({"v": 2, "step": 2, "round": 1, "time": 1, "files": {}}).encode(), "version 2"),
        (json.dumps({"v": 1, "step": 3, "round": 1, "time": 1, "files": {}}).encode(), "says step 3"),
        (json.dumps({"v": 1, "step": 2, "round": "x", "time": 1, "files": {}}).encode(), "'round'"),
        (json.dumps({"v": 1, "step": 2, "round": 1, "time": 1, "files": {}}).encode(), "'files'"),
        (json.dumps({"v": 1, "step": 2, "round": 1, "time": 1,
                     "files": {"../etc/passwd": {"size": 1, "sha256": "0"}}}).encode(), "plain name"),
        (json.dumps({"v": 1, "step": 2, "round": 1, "time": 1,
                     "files": {"state.pt": {"size": "1"}}}).encode(), "'size' and 'sha256'"),
    ],
)
def test_corrupt_manifest_is_skipped_with_a_warning(tmp_path: Path, caplog, content: bytes, expected: str) -> None:
    save(tmp_path, 1)
    save(tmp_path, 2)
    manifest = tmp_path / "step_000000000002.manifest.json"
    manifest.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="agent.worker.checkpoint"):
        latest = ckpt.load_latest(tmp_path)
    assert latest is not None and latest.step == 1
    assert str(manifest) in caplog.text and expected in caplog.text


def test_everything_corrupt_means_no_checkpoint(tmp_path: Path, caplog) -> None:
    save(tmp_path, 1).file("state.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="agent.worker.checkpoint"):
        assert ckpt.load_latest(tmp_path) is None


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    save(tmp_path, 5, data=b"first")
    save(tmp_path, 5, data=b"second")
    latest = ckpt.load_latest(tmp_path)
    assert latest is not None and latest.file("state.pt").read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000000005", "step_000000000005.manifest.json"]


def test_a_failing_payload_writer_leaves_nothing(tmp_path: Path) -> None:
    save(tmp_path, 1)

    def broken(handle) -> None:
        handle.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        ckpt.save(tmp_path, 2, {"state.pt": broken}, round_number=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000000001", "step_000000000001.manifest.json"]
    assert ckpt.latest_step(tmp_path) == 1


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../x"])
def test_bad_payload_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(CheckpointError, match="plain name"):
        ckpt.save(tmp_path, 1, {name: b"x"}, round_number=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_bad_steps_are_refused(tmp_path: Path, step: object) -> None:
    with pytest.raises(CheckpointError, match="non-negative integer"):
        ckpt.save(tmp_path, step, {"x": b"x"}, round_number=1)  # type: ignore[arg-type]


def test_keep_last_deletes_older_complete_checkpoints_and_leftovers(tmp_path: Path) -> None:
    for step in range(1, 6):
        save(tmp_path, step)
    (tmp_path / "step_000000000002.manifest.json").unlink()  # an orphan payload, older than kept
    (tmp_path / ".tmp-step_000000000001-99-abcd").mkdir()  # a crashed save, older than kept
    (tmp_path / ".tmp-step_000000000009-99-abcd").mkdir()  # maybe a save in progress: untouched
    deleted = ckpt.keep_last(tmp_path, 2)
    assert deleted == [1, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".tmp-step_000000000009-99-abcd",
        "step_000000000004", "step_000000000004.manifest.json",
        "step_000000000005", "step_000000000005.manifest.json",
    ]
    assert ckpt.latest_step(tmp_path) == 5


def test_keep_last_counts_only_complete_checkpoints(tmp_path: Path) -> None:
    save(tmp_path, 1)
    save(tmp_path, 2)
    save(tmp_path, 3).file("state.pt").write_bytes(b"")  # truncated newest must not push out step 2
    assert ckpt.keep_last(tmp_path, 1) == [1]
    assert ckpt.latest_step(tmp_path) == 2


def test_keep_last_never_deletes_the_newest(tmp_path: Path) -> None:
    save(tmp_path, 1)
    assert ckpt.keep_last(tmp_path, 1) == []
    assert ckpt.latest_step(tmp_path) == 1
    assert ckpt.keep_last(tmp_path / "missing", 1) == []
    for n in (0, -1):
        with pytest.raises(CheckpointError, match=rf"keep_last n \({n}\) must be an integer >= 1"):
            ckpt.keep_last(tmp_path, n)


def test_save_from_an_older_round_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    save(tmp_path, 10, round_number=4)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(StaleCheckpointError) as caught:
        save(tmp_path, 12, round_number=3)
    assert (caught.value.round_number, caught.value.newer_round, caught.value.newer_step) == (3, 4, 10)
    assert "round 3" in str(caught.value) and "round 4" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # Same round and newer rounds may save; an unfenced save (plain torchrun) is not refused.
    save(tmp_path, 11, round_number=4)
    save(tmp_path, 12, round_number=5)
    save(tmp_path, 13, round_number=None)
    # No round sorts below every round: round 5's step 12 is the latest, not the higher step 13.
    assert ckpt.latest_step(tmp_path) == 12
    assert [c.step for c in ckpt.complete_checkpoints(tmp_path)] == [13, 10, 11, 12]


def test_an_incomplete_newer_round_checkpoint_does_not_fence(tmp_path: Path) -> None:
    save(tmp_path, 1, round_number=2)
    save(tmp_path, 2, round_number=9).file("state.pt").write_bytes(b"")
    save(tmp_path, 3, round_number=2)
    assert ckpt.latest_step(tmp_path) == 3


def test_checkpoint_file_lookup_names_what_exists(tmp_path: Path) -> None:
    written = save(tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"no file 'model.pt' \(it has \['state.pt'\]\)"):
        written.file("model.pt")


def test_importing_checkpoint_does_not_load_torch(tmp_path: Path) -> None:
    import subprocess

    code = ("import agent.worker.checkpoint, agent.worker.choice, agent.worker.protocol, sys; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"
