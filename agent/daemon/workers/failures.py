"""Explaining a worker's failure in one line: how it ended and the exception it raised,
from torch's error file (``@record``) or the last traceback on its stderr. Pure parsing."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def error_file_message(path: Path) -> str | None:
    """The exception line from a torchelastic error file, tolerating the shapes seen in the wild."""
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return None
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, dict):
        text = message.get("message")
        if not isinstance(text, str) or not text.strip():
            extra = message.get("extraInfo")
            callstack = extra.get("py_callstack") if isinstance(extra, dict) else None
            text = exception_line(callstack.splitlines()) if isinstance(callstack, str) else None
    else:
        text = message
    if not isinstance(text, str) or not text.strip():
        return None
    # torch writes "<ExceptionType>: <message>"; a multi-line message is summed up by its first line.
    return text.strip().splitlines()[0].strip()


def exception_line(lines: list[str]) -> str | None:
    """The last traceback's exception line (``ValueError: boom``), else the last non-empty line."""
    start = None
    for index, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            start = index
    if start is not None:
        for line in lines[start + 1 :]:
            if line.strip() and not line[0].isspace():
                return line.strip()
    non_empty = [line.strip() for line in lines if line.strip()]
    return non_empty[-1] if non_empty else None
