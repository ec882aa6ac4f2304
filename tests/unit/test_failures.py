"""agent.daemon.workers.failures, from files alone: torchelastic error files and tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.daemon.workers.failures import describe_exit as _describe_exit
from agent.daemon.workers.failures import error_file_message as _error_file_message
from agent.daemon.workers.failures import exception_line as _exception_line

TRACEBACK = """\
step 1
Traceback (most recent call last):
  File "train.py", line 3, in <module>
    main()
    ^^^^^^
ValueError: first
During handling of the above exception, another exception occurred:
Traceback (most recent call last):
  File "train.py", line 5, in <module>
    raise RuntimeError("second")
RuntimeError: second
  note: a trailing indented line
"""


def test_exception_line_is_the_last_tracebacks() -> None:
    assert _exception_line(TRACEBACK.splitlines()) == "RuntimeError: second"


def test_exception_line_without_traceback_is_last_line() -> None:
    assert _exception_line(["", "fatal: out of memory", "  "]) == "fatal: out of memory"
    assert _exception_line([]) is None


@pytest.mark.parametrize(
    "content,expected",
    [
        (
            {"message": {"message": "ValueError: boom", "extraInfo": {"py_callstack": "x", "timestamp": "1"}}},
            "ValueError: boom",
        ),
        ({"message": "RuntimeError: flat\nmore"}, "RuntimeError: flat"),
        (
            {"message": {"extraInfo": {"py_callstack": "Traceback (most recent call last):\n  f\nKeyError: 'k'\n"}}},
            "KeyError: 'k'",
        ),
        ({"message": {"message": ""}}, None),
        ({"something": "else"}, None),
        ([1, 2], None),
    ],
)
def test_error_file_shapes(tmp_path: Path, content: object, expected: str | None) -> None:
    path = tmp_path / "error.json"
    path.write_text(json.dumps(content))
    assert _error_file_message(path) == expected


def test_error_file_missing_or_garbage(tmp_path: Path) -> None:
    assert _error_file_message(tmp_path / "absent.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert _error_file_message(tmp_path / "bad.json") is None


def test_describe_exit() -> None:
    assert _describe_exit(1) == "exited with code 1"
    assert _describe_exit(-9) == "was killed by SIGKILL"
    assert _describe_exit(-15) == "was killed by SIGTERM"
