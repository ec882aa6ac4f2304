"""Goodput accounting: where one node's wall time went. Pure, with time injected.

Every second from this node's first rendezvous of the job until the job's outcome lands in
exactly one bucket (definitions, with sources, in docs/metrics.md#goodput):

- ``productive``: workers running and completing steps this node had never completed before;
- ``rendezvous``: waiting for a round to close with at least min nodes alive;
- ``below_min_nodes``: waiting in a rendezvous while fewer than min nodes are alive;
- ``startup``: workers started until their first step is reported (process start, framework
  init, process-group setup and checkpoint restore: the agent cannot tell restore apart);
- ``lost_progress``: re-training steps already completed before a restart (the steps between
  the checkpoint resumed from and the highest step reached), plus the unfinished step a
  restart throws away;
- ``drain``: from the decision to restart or leave until the workers are gone (finishing the
  step, the drain checkpoint, or being stopped).

The time since the last step report is *pending*: the next report decides whether it was
productive or redone work, and a restart makes it lost progress. So every counter only ever
grows (Prometheus counters must), and ``elapsed - productive - sum(badput)`` is the pending
time of the step in progress.

Lost progress is measured as the time spent redoing steps, not estimated as
time-per-step x lost steps and subtracted afterwards: subtracting would make the productive
counter go down. Both agree when the redone steps take as long as the originals.

Job-level totals survive agent restarts in etcd: each agent writes its node's totals to
``<root>goodput/<node-id>`` (a plain key, not leased: it outlives the agent) with
:func:`persist`; :func:`load` reads every node's record, :func:`job_totals` sums them;
:func:`sync` and :func:`resume` are what the agent's loop calls.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from agent.common.states import FINAL, State
from rendezvous.errors import CorruptStateError, RendezvousError
from rendezvous.settings import Settings
from rendezvous.state import RestartCount
from rendezvous.store import Store

log = logging.getLogger(__name__)

BADPUT_REASONS = ("rendezvous", "below_min_nodes", "startup", "lost_progress", "drain")
VERSION = 1
_PENDING = "pending"  # the bucket of time since the last step report


def _zero_badput() -> dict[str, float]:
    return {reason: 0.0 for reason in BADPUT_REASONS}


@dataclass(frozen=True)
class Totals:
    """Seconds by bucket, and the highest step ever completed (the line between new work and
    redone work)."""

    elapsed: float = 0.0
    productive: float = 0.0
    badput: dict[str, float] = field(default_factory=_zero_badput)
    highest_step: int = -1

    @property
    def ratio(self) -> float:
        """productive / elapsed, 0-1; 0 before any time was counted."""
        return min(1.0, self.productive / self.elapsed) if self.elapsed > 0 else 0.0

    def plus(self, other: Totals) -> Totals:
        return Totals(
            elapsed=self.elapsed + other.elapsed,
            productive=self.productive + other.productive,
            badput={r: self.badput.get(r, 0.0) + other.badput.get(r, 0.0) for r in BADPUT_REASONS},
            highest_step=max(self.highest_step, other.highest_step),
        )


class GoodputAccount:
    """Fed by the agent's state transitions and its workers' progress, with ``now`` (monotonic
    seconds) passed in. Not thread-safe: the caller holds a lock if it reads from another thread."""

    def __init__(self, base: Totals | None = None) -> None:
        self.base = base or Totals()
        self._state: str | None = None
        self._mark: float | None = None  # when the time up to now was last attributed
        self._elapsed = 0.0
        self._productive = 0.0
        self._badput = _zero_badput()
        self._pending = 0.0
        self._workers = False
        self._segment_step: int | None = None  # last step reported since the workers started
        self._highest = self.base.highest_step
        self._below_min = False

    # --- events ----------------------------------------------------------------------------
    def state(self, state: str, now: float) -> None:
        self._advance(now)
        if state not in (State.RUNNING, State.RESTARTING, State.STOPPING) and self._pending:
            # Leaving the workers' time for good: the unfinished step is lost, except at the
            # end of a successful job, where it was the final save and exit.
            self._commit_pending("productive" if state == State.SUCCEEDED else "lost_progress")
        if state != State.RENDEZVOUS:
            self._below_min = False
        self._state = state

    def workers_started(self, now: float) -> None:
        self._advance(now)
        self._workers = True
        self._segment_step = None
        self._pending = 0.0

    def workers_stopped(self, now: float) -> None:
        self._advance(now)
        self._workers = False
        self._segment_step = None

    def step(self, step: int, now: float) -> None:
        """The workers reported completing ``step`` (a new one for this start of the workers)."""
        self._advance(now)
        if not self._workers:
            return
        last = self._segment_step
        if last is None:
            # The first report ends the startup; the time until now went to the startup bucket.
            self._segment_step = step
            self._highest = max(self._highest, step)
            return
        if step <= last:
            return
        done = step - last
        redone = min(max(0, min(step, self._highest) - last), done)
        lost = self._pending * redone / done
        self._productive += self._pending - lost
        self._badput["lost_progress"] += lost
        self._pending = 0.0
        self._segment_step = step
        self._highest = max(self._highest, step)

    def below_min(self, below: bool, now: float) -> None:
        """Whether fewer than min nodes are alive, as last seen while waiting in a rendezvous."""
        self._advance(now)
        self._below_min = below and self._state == State.RENDEZVOUS

    def rebase(self, base: Totals) -> None:
        """Continue from totals of earlier runs of this node (read from etcd at start)."""
        self.base = base
        self._highest = max(self._highest, base.highest_step)

    # --- reading ---------------------------------------------------------------------------
    def totals(self, now: float) -> Totals:
        """Everything attributed up to ``now`` plus the base (earlier runs of this node).
        The pending time of the step in progress is in ``elapsed`` only."""
        elapsed, productive, badput = self._elapsed, self._productive, dict(self._badput)
        bucket = self._bucket()
        if bucket is not None and self._mark is not None and now > self._mark:
            dt = now - self._mark
            elapsed += dt
            if bucket != _PENDING:
                badput[bucket] += dt
        mine = Totals(elapsed, productive, badput, self._highest)
        return self.base.plus(mine)

    @property
    def highest_step(self) -> int:
        return self._highest

    # --- internals -------------------------------------------------------------------------
    def _bucket(self) -> str | None:
        state = self._state
        if state is None or state == State.INITIALIZING or state in FINAL:
            return None
        if state == State.RENDEZVOUS:
            if self._workers:
                return "drain"  # the agent rejoins at once while its workers drain to a checkpoint
            return "below_min_nodes" if self._below_min else "rendezvous"
        if state == State.RUNNING:
            if not self._workers:
                return "rendezvous"  # workers fenced off (lease lost) and not yet back
            return "startup" if self._segment_step is None else _PENDING
        if state in (State.RESTARTING, State.STOPPING):
            return "drain"
        return "rendezvous"

    def _advance(self, now: float) -> None:
        bucket = self._bucket()
        if bucket is not None and self._mark is not None and now > self._mark:
            dt = now - self._mark
            self._elapsed += dt
            if bucket == _PENDING:
                self._pending += dt
            else:
                self._badput[bucket] += dt
        if self._mark is None or now > self._mark:
            self._mark = now

    def _commit_pending(self, bucket: str) -> None:
        if bucket == "productive":
            self._productive += self._pending
        else:
            self._badput[bucket] += self._pending
        self._pending = 0.0


# --- the record in etcd -------------------------------------------------------------------

@dataclass(frozen=True)
class NodeReport:
    """``<root>goodput/<node-id>``: one node's totals and what ``status`` shows about it.

    ``time`` is the writer's wall clock (display only: nothing compares clocks across nodes).
    ``max_restarts`` is the job-wide budget as this agent was configured (None: unlimited);
    etcd holds no other copy of it.
    """

    node_id: str
    totals: Totals
    state: str = ""
    last_step: int | None = None
    last_step_time: float | None = None
    checkpoint_step: int | None = None
    checkpoint_time: float | None = None
    max_restarts: int | None = None
    time: float = 0.0

    def encode(self) -> bytes:
        t = self.totals
        data: dict[str, Any] = {
            "v": VERSION, "node_id": self.node_id, "state": self.state,
            "elapsed": round(t.elapsed, 3), "productive": round(t.productive, 3),
            "badput": {r: round(t.badput.get(r, 0.0), 3) for r in BADPUT_REASONS},
            "highest_step": t.highest_step, "last_step": self.last_step,
            "last_step_time": self.last_step_time, "checkpoint_step": self.checkpoint_step,
            "checkpoint_time": self.checkpoint_time, "max_restarts": self.max_restarts,
            "time": self.time,
        }
        return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, key: str, raw: bytes) -> NodeReport:
        try:
            d = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deep
            raise CorruptStateError(key, "a JSON goodput record", repr(raw[:60])) from None
        if not isinstance(d, dict) or type(d.get("v")) is not int or d.get("v") != VERSION:  # not true, not 1.0
            found = d.get("v") if isinstance(d, dict) else type(d).__name__
            raise CorruptStateError(key, f'a JSON object with "v": {VERSION} (goodput record)', repr(found))
        badput = d.get("badput")
        if not isinstance(badput, dict):
            raise CorruptStateError(key, "field 'badput' as an object", repr(badput))
        return cls(
            node_id=_typed(key, d, "node_id", str),
            totals=Totals(
                elapsed=_number(key, d, "elapsed"), productive=_number(key, d, "productive"),
                badput={r: _number(key, badput, r, default=0.0) for r in BADPUT_REASONS},
                highest_step=_typed(key, d, "highest_step", int),
            ),
            state=d.get("state") if isinstance(d.get("state"), str) else "",
            last_step=_optional(key, d, "last_step", int),
            last_step_time=_optional(key, d, "last_step_time", float),
            checkpoint_step=_optional(key, d, "checkpoint_step", int),
            checkpoint_time=_optional(key, d, "checkpoint_time", float),
            max_restarts=_optional(key, d, "max_restarts", int),
            time=_number(key, d, "time", default=0.0),
        )


def _typed(key: str, d: dict[str, Any], name: str, kind: type) -> Any:
    value = d.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CorruptStateError(key, f"field {name!r} of type {kind.__name__}", repr(value))
    return value


_FLOAT_MAX = sys.float_info.max


def _number(key: str, d: dict[str, Any], name: str, default: float | None = None) -> float:
    value = d.get(name, default)
    # JSON's NaN and Infinity parse as floats, a 400-digit integer as one no float holds: each
    # would make every goodput figure NaN, or raise OverflowError.
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < _FLOAT_MAX:
        raise CorruptStateError(key, f"field {name!r} as a number >= 0", repr(value))
    return float(value)


def _optional(key: str, d: dict[str, Any], name: str, kind: type) -> Any:
    value = d.get(name)
    if value is None:
        return None
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not -_FLOAT_MAX < value < _FLOAT_MAX:
            raise CorruptStateError(key, f"field {name!r} a finite number or null", repr(value))
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CorruptStateError(key, f"field {name!r} of type {kind.__name__} or null", repr(value))
    return value


def goodput_prefix(settings: Settings) -> str:
    return f"{settings.root}goodput/"


def goodput_key(settings: Settings, node_id: str) -> str:
    return f"{goodput_prefix(settings)}{node_id}"


def persist(store: Store, settings: Settings, node_id: str, report: NodeReport) -> int:
    """Write this node's record (one transaction, not leased) and read the job-wide restart
    count in the same request. Returns the restarts used so far."""
    if report.node_id != node_id:
        report = replace(report, node_id=node_id)
    result = store.commit([], [(goodput_key(settings, node_id), report.encode())],
                          reads=(settings.restarts_key,))
    (restarts_kv,) = result.reads
    if restarts_kv is None:
        return 0
    return RestartCount.decode(restarts_kv.key, restarts_kv.value).count


def load(store: Store, settings: Settings) -> dict[str, NodeReport]:
    """Every node's record, by node id. A record that does not parse is skipped with a
    warning naming its key (one bad record must not hide the others)."""
    kvs, _ = store.get_prefix(goodput_prefix(settings))
    out: dict[str, NodeReport] = {}
    for kv in kvs:
        try:
            report = NodeReport.decode(kv.key, kv.value)
        except RendezvousError as exc:
            log.warning("%s; skipped", exc)
            continue
        out[report.node_id] = report
    return out


def job_totals(reports: dict[str, NodeReport] | list[NodeReport]) -> Totals:
    """The job's totals: node-seconds summed over every node that ever took part."""
    total = Totals()
    for report in (reports.values() if isinstance(reports, dict) else reports):
        total = total.plus(report.totals)
    return total


def sync(store: Store, settings: Settings, report: NodeReport, *, job_wide: bool) -> tuple[int, Totals | None]:
    """Write this node's record and read the job's restart count (one transaction); with
    ``job_wide`` also read every node's record. Returns (restarts used, the other nodes'
    totals or None). Raises RendezvousError; the loop calls it every ~60 s, on state changes, and at exit."""
    used = persist(store, settings, report.node_id, report)
    if not job_wide:
        return used, None
    reports = load(store, settings)
    reports.pop(report.node_id, None)
    return used, job_totals(reports)


def resume(store: Store, settings: Settings, node_id: str) -> NodeReport | None:
    """This node's record from an earlier agent run (one read), or None. A record that does
    not parse is logged and ignored: goodput must not stop an agent."""
    kv, _ = store.get(goodput_key(settings, node_id))
    if kv is None:
        return None
    try:
        return NodeReport.decode(kv.key, kv.value)
    except CorruptStateError as exc:
        log.warning("%s; this node's goodput starts from zero", exc)
        return None
