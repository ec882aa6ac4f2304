"""Fuzzed checkpoint directories (DESIGN.md invariants 4 and 5): a manifest, payload file or
fence file cut short, flipped, overwritten with garbage or removed is skipped with a warning
that names it, and what is loaded instead is a whole checkpoint, byte for byte what was saved;
never half of one, never an exception. Derandomized and bounded: a few seconds.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.worker import checkpoint as ckpt
from agent.worker.choice import choose
from agent.worker.manifest import FENCE_FILE, read_fence

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
# (step, round, payload) of the checkpoints every example starts from; the last is the latest.
SAVED = [
    (10, 1, {"model.pt": b"m" * 300, "optim.pt": b"o" * 50}),
    (20, 1, {"model.pt": bytes(range(256)) * 2, "optim.pt": b"p" * 70}),
    (30, 2, {"model.pt": b"\x00\x01" * 200, "optim.pt": b"q" * 90}),
]
PAYLOAD = {step: files for step, _, files in SAVED}
JSON_EDGES = [None, True, 0, -1, 1, 2, 10**400, 1.5, float("nan"), "", "x", [], {}, {"size": 1}, "../x",
              [[[[[]]]]]]


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@st.composite
def damage(draw) -> tuple[str, int, str, object]:
    """(what, step, file name, how): the part of one checkpoint to damage, and how."""
    step = draw(st.sampled_from([s for s, _, _ in SAVED]))
    what = draw(st.sampled_from(["payload", "payload", "manifest", "manifest", "field", "fence", "gone"]))
    name = draw(st.sampled_from(sorted(PAYLOAD[step])))
    if what == "field":
        field = draw(st.sampled_from([("v",), ("step",), ("round",), ("time",), ("files",), ("files", name),
                                      ("files", name, "size"), ("files", name, "sha256"), ("files", "../x")]))
        return what, step, name, (field, draw(st.sampled_from(JSON_EDGES)))
    if what == "gone":
        return what, step, name, draw(st.sampled_from(["payload", "manifest", "dir"]))
    how = draw(st.sampled_from(["truncate", "flip", "garbage", "deep", "empty"]))
    return what, step, name, (how, draw(st.integers(0, 10**6)), draw(st.binary(max_size=40)))


def spoil(data: bytes, how: tuple) -> bytes:
    kind, at, garbage = how
    if kind == "truncate":
        return data[: at % max(1, len(data))]
    if kind == "flip" and data:
        i = at % len(data)
        return data[:i] + bytes([data[i] ^ (1 << (at % 8))]) + data[i + 1:]
    if kind == "deep":
        return b"[" * 100_000
    if kind == "empty":
        return b""
    return garbage


def apply(directory: Path, case: tuple) -> Path:
    """Damage the directory as ``case`` says; returns the path of the file damaged."""
    what, step, name, how = case
    manifest = directory / ckpt.manifest_name(step)
    payload = directory / ckpt.step_dir_name(step) / name
    if what == "payload":
        payload.write_bytes(spoil(payload.read_bytes(), how))
        return payload
    if what == "manifest":
        manifest.write_bytes(spoil(manifest.read_bytes(), how))
        return manifest
    if what == "fence":
        fence = directory / FENCE_FILE
        fence.write_bytes(spoil(fence.read_bytes(), how))
        return fence
    if what == "field":
        field, value = how
        document = json.loads(manifest.read_bytes())
        target = document
        for part in field[:-1]:
            target = target[part]
        target[field[-1]] = value
        manifest.write_text(json.dumps(document))
        return manifest
    if how == "payload":
        payload.unlink()
        return payload
    if how == "manifest":
        manifest.unlink()
        return directory / ckpt.step_dir_name(step)
    for child in (directory / ckpt.step_dir_name(step)).iterdir():
        child.unlink()
    (directory / ckpt.step_dir_name(step)).rmdir()
    return directory / ckpt.step_dir_name(step)


def whole(checkpoint: ckpt.Checkpoint) -> None:
    """Every file of ``checkpoint`` is exactly what was saved for its step."""
    saved = PAYLOAD[checkpoint.step]
    assert set(checkpoint.files) == set(saved), checkpoint
    for name, data in saved.items():
        assert (checkpoint.path / name).read_bytes() == data, (checkpoint.step, name)
        assert checkpoint.files[name].sha256 == hashlib.sha256(data).hexdigest()


@functools.cache
def pristine() -> Path:
    """The saved checkpoints, once (save fsyncs every file); each example damages a copy."""
    directory = Path(tempfile.mkdtemp(prefix="fuzz-ckpt-pristine-"))
    for step, round_number, files in SAVED:
        ckpt.save(directory, step, files, round_number=round_number, now=lambda: 1000.0)
    (directory / FENCE_FILE).write_text(json.dumps({"v": 1, "round": 2}))
    return directory


def check(case: tuple) -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-ckpt-") as tmp:
        directory = Path(tmp) / "ckpt"
        shutil.copytree(pristine(), directory)
        damaged = apply(directory, case)
        warnings = Warnings()
        logger = logging.getLogger("agent.worker.checkpoint")
        logger.addHandler(warnings)
        try:
            latest = ckpt.load_latest(directory)
            chosen = choose(directory, ["model.pt"])
            steps = [c.step for c in ckpt.complete_checkpoints(directory, check_hashes=True)]
            fence = read_fence(directory)
        finally:
            logger.removeHandler(warnings)
        for found in (latest, chosen.checkpoint if chosen else None):
            if found is not None:
                whole(found)
        if chosen is not None:
            assert chosen.payload["model.pt"] == PAYLOAD[chosen.checkpoint.step]["model.pt"]
        assert (latest is None) == (chosen is None) and (latest is None or latest.step == chosen.checkpoint.step)
        assert fence is None or isinstance(fence, int) and not isinstance(fence, bool)
        # What was passed over because of the damage was said, naming the file.
        intact = [s for s, _, _ in SAVED if s != case[1] or case[0] == "fence"]
        passed_over = latest is None or case[1] > latest.step  # load_latest stops at the first good one
        if case[0] != "fence" and case[1] not in steps and passed_over:
            # Named by the file damaged, or by the checkpoint's manifest or directory.
            named = (str(damaged), str(directory / ckpt.manifest_name(case[1])),
                     str(directory / ckpt.step_dir_name(case[1])))
            assert any(n in line for line in warnings.lines for n in named), (damaged, warnings.lines)
        assert set(intact) <= set(steps), (intact, steps)
        if case[0] == "fence" and fence is None:
            assert any(str(damaged) in line for line in warnings.lines), (damaged, warnings.lines)
        # keep_last works on what is there, and never deletes the newest checkpoint whose
        # sizes match (it checks no hashes: see the xfail test below for what that costs).
        sized = ckpt.complete_checkpoints(directory)
        ckpt.keep_last(directory, 1)
        if sized:
            assert ckpt.latest_step(directory, check_hashes=False) == sized[-1].step


@FUZZ
@given(damage())
@example(("manifest", 30, "model.pt", ("deep", 0, b"")))
@example(("field", 30, "model.pt", (("time",), 10**400)))
@example(("fence", 30, "model.pt", ("deep", 0, b"")))
@example(("payload", 30, "model.pt", ("truncate", 100, b"")))
@example(("payload", 30, "optim.pt", ("flip", 7, b"")))
def test_a_damaged_checkpoint_is_skipped_with_a_warning_and_never_loaded_half(case) -> None:
    check(case)


def test_keep_last_leaves_a_loadable_checkpoint_when_the_newest_has_a_flipped_bit(tmp_path) -> None:
    for step, round_number, files in SAVED:
        ckpt.save(tmp_path, step, files, round_number=round_number, now=lambda: 1000.0)
    apply(tmp_path, ("payload", 30, "optim.pt", ("flip", 7, b"")))
    assert ckpt.latest_step(tmp_path) == 20
    ckpt.keep_last(tmp_path, 1)
    assert ckpt.latest_step(tmp_path) == 20


def teardown_module() -> None:
    if pristine.cache_info().currsize:
        shutil.rmtree(pristine(), ignore_errors=True)
