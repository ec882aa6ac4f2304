"""A job's whole history in etcd, and what it must never show (DESIGN.md section 7, invariant 1).

Read with a watch from revision 1 over the job's prefix: etcd replays every change it still
keeps, which is all of them, because the chaos clusters never compact (no
``--auto-compaction-*``, and nothing calls compact). A compacted start is an error, never a
silently shorter history. To know when the replay is complete, a sentinel key is written
under the prefix first; its event is the last one read.

Run as ``python -m tests.chaos.history --endpoints E --prefix P`` where the runner cannot
reach etcd itself (inside a network namespace): one JSON event per line on stdout.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rendezvous.errors import CorruptStateError
from rendezvous.settings import Settings
from rendezvous.state import JobStatus, RestartCount, RoundPhase, RoundState
from rendezvous.store import DELETE, PUT, Event

REPO = Path(__file__).resolve().parents[2]
SENTINEL = "zz-chaos-history-end"
REPLAY_TIMEOUT_S = 60.0


class HistoryError(RuntimeError):
    """The history could not be read whole (etcd away, or compacted)."""


def replay(endpoints: str, prefix: str) -> list[Event]:
    """Every event under ``prefix`` since revision 1, in revision order."""
    from rendezvous.etcd.store import EtcdStore  # noqa: PLC0415 - only where etcd is reachable

    store = EtcdStore(endpoints, retry_for=10.0)
    events: list[Event] = []
    done = threading.Event()
    failure: list[Exception] = []
    try:
        last = store.put(prefix + SENTINEL, b"1")

        def on_events(batch: list[Event]) -> None:
            events.extend(batch)
            if any(ev.mod_revision >= last for ev in batch):
                done.set()

        def on_error(exc: Exception) -> None:
            failure.append(exc)
            done.set()

        watch = store.watch(prefix, on_events, on_error, start_revision=1, prefix=True)
        if not done.wait(REPLAY_TIMEOUT_S):
            raise HistoryError(f"the replay of {prefix} from revision 1 did not reach revision {last} "
                               f"in {REPLAY_TIMEOUT_S:.0f}s")
        watch.cancel()
        if failure:
            raise HistoryError(f"cannot replay {prefix} from revision 1: {failure[0]}")
        return [ev for ev in events if ev.key != prefix + SENTINEL]
    finally:
        store.close()


def read(endpoints: str, prefix: str, wrap: Sequence[str] = ()) -> list[Event]:
    """:func:`replay`, run where etcd is reachable (``wrap``: ``ip netns exec NS``)."""
    cmd = [*wrap, sys.executable, "-m", "tests.chaos.history", "--endpoints", endpoints, "--prefix", prefix]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=REPLAY_TIMEOUT_S + 30, cwd=REPO)
    if proc.returncode != 0:
        raise HistoryError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    out = []
    for line in proc.stdout.splitlines():
        d = json.loads(line)
        out.append(Event(d["kind"], d["key"], base64.b64decode(d["value"]), d["create_revision"], d["mod_revision"]))
    return out


@dataclass
class RoundHistory:
    """What the history says about rounds: each closed round's assignment (node ids in rank
    order, with their nproc) and the violations found."""

    assignments: dict[int, tuple[tuple[str, int], ...]]
    last_round: int
    violations: list[str]


def check(events: list[Event], settings: Settings) -> RoundHistory:
    """Invariant 1 over the history: one assignment per round, each node (so each rank) once in
    it; the round number never goes back (a stale writer never replaced a newer decision); the
    round key never deleted; the job's outcome written once; the restart count only counting up."""
    assignments: dict[int, tuple[tuple[str, int], ...]] = {}
    first_rev: dict[int, int] = {}
    violations: list[str] = []
    last = 0
    outcomes = 0
    restarts = -1
    for ev in events:
        if ev.key == settings.round_key:
            if ev.kind == DELETE:
                violations.append(f"the round key was deleted at revision {ev.mod_revision}")
                continue
            try:
                rnd = RoundState.decode(ev.key, ev.value)
            except CorruptStateError as exc:
                violations.append(f"revision {ev.mod_revision}: {exc}")
                continue
            if rnd.number < last:
                violations.append(f"revision {ev.mod_revision}: round went back from {last} to {rnd.number}")
            last = max(last, rnd.number)
        elif ev.key.startswith(f"{settings.root}rounds/") and ev.key.endswith("/members") and ev.kind == PUT:
            # A closed round's assignment, written with its close (rendezvous/protocol/round_members.py).
            try:
                number = int(ev.key.split("/")[-2])
                rnd = RoundState(number, RoundPhase.CLOSED).with_members(ev.key, ev.value)
            except (ValueError, CorruptStateError) as exc:
                violations.append(f"revision {ev.mod_revision}: {exc}")
                continue
            assert rnd.assignment is not None
            given = tuple((m.node_id, m.nproc) for m in rnd.assignment.members)
            if len({node for node, _ in given}) != len(given):
                violations.append(f"round {rnd.number} (revision {ev.mod_revision}) gives a node two ranks: {given}")
            if rnd.number in assignments and assignments[rnd.number] != given:
                violations.append(f"round {rnd.number} has two assignments: {assignments[rnd.number]} "
                                  f"(revision {first_rev[rnd.number]}) and {given} (revision {ev.mod_revision})")
            assignments.setdefault(rnd.number, given)
            first_rev.setdefault(rnd.number, ev.mod_revision)
        elif ev.key == settings.status_key and ev.kind == PUT:
            outcomes += 1
            if outcomes > 1:
                violations.append(f"the job's outcome was written twice (revision {ev.mod_revision})")
            _decoded(JobStatus, ev, violations)
        elif ev.key == settings.restarts_key and ev.kind == PUT:
            count = _decoded(RestartCount, ev, violations)
            if count is not None and restarts >= 0 and count.count != restarts + 1:
                violations.append(f"revision {ev.mod_revision}: restart count went from {restarts} to {count.count}")
            restarts = count.count if count is not None else restarts
    return RoundHistory(assignments, last, violations)


def _decoded(cls: type, ev: Event, violations: list[str]):  # noqa: ANN202
    try:
        return cls.decode(ev.key, ev.value)  # type: ignore[attr-defined]
    except CorruptStateError as exc:
        violations.append(f"revision {ev.mod_revision}: {exc}")
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", required=True)
    parser.add_argument("--prefix", required=True)
    args = parser.parse_args(argv)
    try:
        events = replay(args.endpoints, args.prefix)
    except Exception as exc:  # noqa: BLE001 - one line for the runner, whatever went wrong
        print(f"history: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for ev in events:
        print(json.dumps({"kind": ev.kind, "key": ev.key, "value": base64.b64encode(ev.value).decode(),
                          "create_revision": ev.create_revision, "mod_revision": ev.mod_revision}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
