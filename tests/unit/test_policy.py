"""agent.daemon.policy: what worker exits mean, reading progress files, who is silent."""

from __future__ import annotations

import json

import pytest

from agent.daemon.policy import Progress, Verdict, helper_in_use, judge_exits, read_progress, silent_ranks


@pytest.mark.parametrize("codes, verdict", [
    ([], Verdict((), False, False)),
    ([None, None], Verdict((), False, False)),
    ([0, 0], Verdict((), True, False)),
    ([0, None], Verdict((), False, False)),
    ([75, 0], Verdict((), False, True)),
    ([75, None], Verdict((), False, False)),
    ([1, None, -15], Verdict((0, 2), False, False)),
    ([0, 75, 3], Verdict((2,), False, False)),
])
def test_judge_exits(codes, verdict) -> None:
    assert judge_exits(codes) == verdict


def test_read_progress_ignores_missing_and_garbled_files(tmp_path) -> None:
    good, garbled, missing, wrong = (tmp_path / n for n in ("a", "b", "c", "d"))
    good.write_text(json.dumps({"v": 1, "step": 7, "time": 12.5, "mono": 3.25, "pid": 1, "phase": "train",
                                "new": True}))
    garbled.write_text("{not json")
    wrong.write_text(json.dumps({"v": 1, "step": "seven", "time": 1}))
    assert read_progress([good, garbled, missing, wrong]) == [Progress(7, 12.5, 3.25, "train"), None, None, None]


def test_helper_in_use_once_any_rank_wrote_a_progress_file(tmp_path) -> None:
    files = [tmp_path / "0", tmp_path / "1"]
    assert not helper_in_use(files)
    files[1].write_text("{}")
    assert helper_in_use(files)


def at(step: int, mono: float) -> Progress:
    """A report at monotonic time ``mono``; its wall time is deliberately unrelated."""
    return Progress(step, time=1.7e9 - 12345.0, mono=mono)


@pytest.mark.parametrize("progress, codes, now, expected", [
    ([None, None], [None, None], 200.0, []),  # helper not in use: never a hang
    ([at(1, 150.0), None], [None, None], 200.0, [0, 1]),  # never reported: counted from the start
    ([at(1, 150.0), at(1, 185.0)], [None, None], 200.0, [0]),
    ([at(1, 150.0), at(1, 150.0)], [0, None], 200.0, [1]),  # an exited rank is not silent
    ([at(1, 171.0), at(1, 171.0)], [None, None], 200.0, []),  # 29 s < 30 s
    ([at(1, 170.0), None], [None, None], 189.0, [1]),  # the start was 100.0: 89 s ago
    ([Progress(1, 0.0), at(1, 199.0)], [None, None], 200.0, []),  # no monotonic time: never silent
])
def test_silent_ranks(progress, codes, now, expected) -> None:
    assert silent_ranks(progress, codes, 30.0, now, started=100.0) == expected


def test_an_ntp_step_of_the_wall_clock_fires_no_hang() -> None:
    stepped = Progress(1, time=1.7e9 + 3600.0, mono=195.0)  # the wall clock jumped an hour
    assert silent_ranks([stepped], [None], 30.0, 200.0, started=100.0) == []


def test_no_hang_detection_when_off() -> None:
    assert silent_ranks([at(1, 0.0)], [None], 0.0, 1e9, started=0.0) == []
