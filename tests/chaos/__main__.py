"""``make chaos``: every scenario of tests/chaos/scenarios.py and tests/chaos/peers.py, and the
seeded soak (tests/chaos/soak.py), each in a world of its own (tests/chaos/world.py): a real 3-member
etcd and real agents in network namespaces this run creates and removes. After each, the
invariants of DESIGN.md section 7 are checked; at the end, a table. Exit 1 on any violation,
2 when network namespaces cannot be made here.

    python -m tests.chaos                       # everything (~25 minutes on 2 cores)
    python -m tests.chaos --only quorum --no-soak
    python -m tests.chaos --only soak --seed 7 --soak-seconds 120 --soak-steps 1000

What a dead run left (namespaces, and the processes in them) is removed at the start.
Consoles and etcd logs of a scenario with violations are kept under --logs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos import netns
from tests.chaos.peers import PEER_SCENARIOS, RELAYED
from tests.chaos.scenarios import SCENARIOS, Measured
from tests.chaos.soak import Soak
from tests.chaos.world import World

SOAK = "soak (kill, TERM, freeze, join, etcd)"


@dataclass
class Row:
    name: str
    measured: Measured | None = None
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    logs: Path | None = None

    @property
    def outcome(self) -> str:
        if self.measured is None:
            return "ERROR"
        return "ok" if not self.violations else "VIOLATED"


def run_one(name: str, tag: str, logs: Path, body, keep: bool = False,  # noqa: ANN001 - a World -> Measured
            relayed: tuple[str, ...] = ()) -> Row:
    row = Row(name)
    began = time.monotonic()
    print(f"--- {name}", flush=True)
    with World(f"chaos-{tag}", tag, relayed) as world:
        try:
            row.measured = body(world)
        except AssertionError as exc:  # a wait ran out: recovery was not bounded
            row.violations.append(f"inv 3: {exc}")
        except Exception as exc:  # noqa: BLE001 - the table still comes, with this row failed
            row.violations.append(f"error: {type(exc).__name__}: {exc}")
        world.cluster.stop_agents()
        row.violations += world.verdict()
        if row.violations or keep:
            row.logs = world.keep_logs(logs / tag)
        summary = getattr(world, "checkpoint_summary", "")
    row.seconds = time.monotonic() - began
    print(f"    {row.outcome} in {row.seconds:.0f}s; {summary}", flush=True)
    for v in row.violations:
        print(f"    ! {v}", flush=True)
    return row


def table(rows: list[Row]) -> str:
    head = ("scenario", "outcome", "recovery s", "steps lost", "violations")
    body = [(r.name, r.outcome, f"{r.measured.recovery_s:.1f}" if r.measured else "-",
             str(r.measured.lost) if r.measured else "-", str(len(r.violations))) for r in rows]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]
    out.append("")
    out.append("recovery s: the longest pause in training from the fault to the scenario's end; steps lost: "
               "completed steps trained again")
    for r in rows:
        if r.measured and r.measured.note:
            out.append(f"  {r.name}: {r.measured.note} ({r.seconds:.0f}s)")
        for v in r.violations:
            out.append(f"  ! {r.name}: {v}")
        if r.logs:
            out.append(f"    logs kept in {r.logs}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the scenarios whose name contains this")
    parser.add_argument("--no-soak", action="store_true")
    parser.add_argument("--seed", type=int, default=None, help="the soak's seed (default: a fresh one, printed)")
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--soak-steps", type=int, default=5500, help="the soak job's final step + 1")
    parser.add_argument("--keep-logs", action="store_true", help="keep every scenario's logs, not only failed ones")
    parser.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "elastic-agent-chaos-logs")
    args = parser.parse_args(argv)
    why = netns.unavailable()
    if why:
        print(f"chaos: {why}", file=sys.stderr)
        return 2
    for ns in netns.sweep():
        print(f"removed {ns}, left by a chaos run that died", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds the worlds: everything is removed
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    began = time.monotonic()
    rows = [run_one(name, str(i), args.logs, body, args.keep_logs, RELAYED.get(name, ()))
            for i, (name, body) in enumerate({**SCENARIOS, **PEER_SCENARIOS}.items()) if args.only.lower() in name.lower()]
    if not args.no_soak and args.only.lower() in SOAK:
        print(f"soak seed {seed}", flush=True)
        rows.append(run_one(SOAK, "soak", args.logs,
                            lambda world: Soak(world, seed, args.soak_seconds, args.soak_steps).run(), args.keep_logs))
    print()
    print(table(rows))
    print(f"\n{len(rows)} scenarios in {time.monotonic() - began:.0f}s; soak seed {seed}")
    left = [ns for ns in netns.existing_namespaces() if ns.startswith(f"{netns.PREFIX}{os.getpid()}-")]
    if left:
        print(f"network namespaces left behind: {left}", file=sys.stderr)
        return 1
    return 1 if any(r.violations for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
