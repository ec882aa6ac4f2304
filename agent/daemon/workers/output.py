"""Where a worker's output goes: always its log file and, line by line after a prefix, the
agent's console when the worker's route sends that stream there (agent.daemon.config.console).
A pre-started worker has neither yet, so its first lines are buffered until it is given a
rank."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import IO

_CONSOLE_LOCK = threading.Lock()  # several groups may share one console
MAX_LINE = 64 * 1024
_BUFFERED_LINES = 1000


class Sink:
    """Where one output stream of a worker goes: buffered until the worker has a log file and
    a console route (a pre-started worker has neither yet), then appended and, when it has a
    console, echoed there after ``prefix``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer: list[bytes] = []
        self._log: IO[bytes] | None = None
        self._prefix = ""
        self._console: IO[str] | None = sys.stdout

    def attach(self, path: Path, prefix: str, console: IO[str] | None) -> None:
        """From now on lines go to ``path`` and, unless ``console`` is None, to ``console``
        as ``prefix + line``."""
        with self._lock:
            self._log = path.open("ab", buffering=0)
            self._prefix = prefix
            self._console = console
            for line in self._buffer:
                self._emit(line)
            self._buffer.clear()

    def relabel(self, prefix: str) -> None:
        """A new prefix (the worker re-formed in process and holds another rank now)."""
        with self._lock:
            self._prefix = prefix

    def write(self, line: bytes) -> None:
        with self._lock:
            if self._log is None:
                if len(self._buffer) < _BUFFERED_LINES:
                    self._buffer.append(line)
                return
            self._emit(line)

    def _emit(self, line: bytes) -> None:
        assert self._log is not None
        self._log.write(line)
        if self._console is None:
            return
        text = line.decode("utf-8", errors="replace")
        if not text.endswith("\n"):
            text += "\n"
        with _CONSOLE_LOCK:
            try:
                self._console.write(self._prefix + text)
                self._console.flush()
            except (OSError, ValueError):
                pass  # a closed console must not stop the log file

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()


def pump(pipe: IO[bytes], sink: Sink) -> None:
    """Copy ``pipe`` to ``sink`` line by line until the writer is gone (a reader thread)."""
    with pipe:
        for line in iter(lambda: pipe.readline(MAX_LINE), b""):
            sink.write(line)
    sink.close()
