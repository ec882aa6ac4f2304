"""The control file: what the agent asks of its node's workers, as one small JSON document.
No torch: the agent writes it, the helper reads it.

The agent replaces the file atomically (temp name, ``os.replace``); the helper reads it only
when its modification time or size changed, so its per-step cost is one ``stat``::

    {"v": 1, "seq": 7,
     "clear_to": 124,             # run no step past 124 until told more (absent: no limit)
     "stop_at": 120,              # stop (or re-form) right after completing step 120
     "leave": false,              # this node's workers exit after stop_at: the node is leaving
     "abort": 3,                  # in-process: the process group of round 3 is broken, abort it
     "reform": {"round": 4, ...}} # in-process: join round 4's process group (see Reform)

Every rank of the job learns the same ``stop_at`` (the agents publish it in etcd), so every
rank stops at exactly that step without a collective of its own. ``clear_to`` makes that
safe when an agent is slow: a worker never starts a step past it, and a stop step is chosen
at or past every agent's ``clear_to`` (agent.daemon.planning), so no rank can be a step
ahead of the stop when it learns of it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

VERSION = 1
CLEARANCE_POLL = 0.005  # how often a worker waiting for the agent's clearance reads the file
CLEARANCE_WARN = 10.0  # seconds of waiting before the worker says so

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reform:
    """A worker's place in the next round, for re-forming in process."""

    round: int
    rank_offset: int  # global rank of this node's local rank 0
    world_size: int
    local_world_size: int
    group_rank: int
    group_world_size: int
    master_addr: str
    master_port: int
    restart_count: int
    # The stop step of the planned change this round follows (None: a failure). A worker
    # that passed it may read this re-form before it read the stop: its reason is the same.
    planned_stop: int | None = None

    def rank(self, local_rank: int) -> int:
        return self.rank_offset + local_rank


@dataclass(frozen=True)
class Control:
    seq: int = 0
    stop_at: int | None = None
    clear_to: int | None = None  # the last step the workers may start (None: no limit)
    leave: bool = False
    abort: int = 0
    reform: Reform | None = None

    def encode(self) -> bytes:
        data: dict[str, Any] = {"v": VERSION, "seq": self.seq, "stop_at": self.stop_at, "leave": self.leave,
                                "abort": self.abort, "reform": asdict(self.reform) if self.reform else None}
        if self.clear_to is not None:
            data["clear_to"] = self.clear_to
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Control:
        """A control document; anything unreadable is "nothing asked" (the agent rewrites the
        whole file, so a torn read cannot happen, but a stray file must not stop training)."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("v") != VERSION:
                return cls()
            reform = data.get("reform")
            return cls(
                seq=int(data.get("seq", 0)),
                stop_at=_step(data.get("stop_at")),
                clear_to=_step(data.get("clear_to")),
                leave=data.get("leave") is True,
                abort=int(data.get("abort") or 0),
                reform=Reform(**reform) if isinstance(reform, dict) else None,
            )
        except (ValueError, TypeError, OverflowError, RecursionError):  # inf, 1e400, [[[[...]]]]
            return cls()


def _step(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def write(path: Path, control: Control) -> None:
    """Replace the control file atomically: a reader sees the old document or the new one."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_bytes(control.encode())
    os.replace(temp, path)


class Reader:
    """Reads the control file again only when it changed (one ``stat`` per call otherwise)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._last = Control()

    def read(self) -> Control:
        if self.path is None:
            return self._last
        try:
            info = os.stat(self.path)
        except OSError:
            return self._last
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)  # each write is a new inode
        if stamp != self._seen:
            try:
                raw = self.path.read_bytes()
            except OSError:
                return self._last
            self._seen = stamp
            self._last = Control.decode(raw)
        return self._last


def await_clearance(reader: Reader, step: int, until: Callable[[Control], bool] = lambda ask: False) -> Control:
    """The control document once it lets this worker start ``step``, or names a stop step,
    or ``until`` holds. The agent clears its workers a few steps ahead, so this waits only
    when the agent is behind (slow, or choosing a stop step)."""
    ask = reader.read()
    began = time.monotonic()
    warned = False
    while ask.clear_to is not None and ask.clear_to < step and ask.stop_at is None and not until(ask):
        if not warned and time.monotonic() - began >= CLEARANCE_WARN:
            log.warning("waiting %.0fs for the agent to clear step %d (it cleared up to %d)", CLEARANCE_WARN,
                        step, ask.clear_to)
            warned = True
        time.sleep(CLEARANCE_POLL)
        ask = reader.read()
    return ask
