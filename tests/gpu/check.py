#!/usr/bin/env python3
"""The GPU check: the end-to-end scenarios on this machine's NVIDIA GPUs, then a table.

    bash tests/gpu/run.sh              # a fresh GPU box: installs a CUDA torch if needed, runs this
    python -m tests.gpu.check          # with a Python whose torch sees the GPUs
    python tests/gpu/check.py --cpu-dry-run   # the same scenarios with gloo on CPU (no GPU needed)

Real agents on 127.0.0.1 with an embedded etcd (tests/e2e/harness.py), real workers
(docs/examples/train_ddp.py through tests/gpu/worker.py) on ``cuda:LOCAL_RANK``. What runs
depends on the GPUs (tests/gpu/plan.py). Each scenario has a deadline and the whole run a
budget (``--budget``, default 480 s, inside a 10-minute device session); whatever fails, the
table is printed, with the reason in its notes and the agents' last lines below it.

Exit codes: 0 every scenario passed (or no GPU: nothing run); 1 a scenario failed;
2 this Python's torch cannot use the GPUs nvidia-smi lists (tests/gpu/run.sh installs one that
can); 130/143 interrupted (the table of what ran is still printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository's packages by their full names
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.gpu import plan as p  # noqa: E402
from tests.gpu.smi import Smi, normal_uuid  # noqa: E402

TORCH_PROBE = ("import json, torch; c = torch.cuda.is_available(); nccl = None\n"
               "try: nccl = '.'.join(map(str, torch.cuda.nccl.version())) if c else None\n"
               "except Exception: pass\n"
               "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'available': c,"
               " 'count': torch.cuda.device_count() if c else 0, 'nccl': nccl}))")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tests/gpu/check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the same scenarios with gloo on CPU (smaller; no GPU needed)")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds for all scenarios together; one is not started with less than 30 s left")
    parser.add_argument("--only", default="", help=f"comma-separated scenarios to run, of {','.join(p.SCENARIOS)}")
    parser.add_argument("--list", action="store_true", help="print what would run on this machine, run nothing")
    args = parser.parse_args(argv)
    unknown = sorted(set(filter(None, args.only.split(","))) - set(p.SCENARIOS))
    if unknown:
        parser.error(f"--only: unknown scenario {', '.join(unknown)} (known: {', '.join(p.SCENARIOS)})")
    if args.budget <= 0:
        parser.error(f"--budget ({args.budget:g}) must be positive")
    return args


def visible_entries(environ: dict[str, str] | os._Environ, uuids: Sequence[str]) -> tuple[list[str], str]:
    """The GPUs a worker would see: CUDA_VISIBLE_DEVICES's entries up to the first invalid one
    (CUDA's rule), else every GPU nvidia-smi lists (by UUID, unambiguous whatever CUDA's order)."""
    if "CUDA_VISIBLE_DEVICES" not in environ:
        return list(uuids), f"nvidia-smi lists {len(uuids)}"
    value = environ["CUDA_VISIBLE_DEVICES"]
    entries = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry or (entry.lstrip("-").isdigit() and int(entry) < 0):
            break
        entries.append(entry)
    return entries, f"CUDA_VISIBLE_DEVICES={value!r}, nvidia-smi lists {len(uuids)}"


def probe_torch(python: str = sys.executable, timeout: float = 180.0) -> dict | str:
    """What this Python's torch says about CUDA, asked in a child: this process never holds a
    CUDA context (it would hold GPU memory and hide a leak). A string when it cannot tell."""
    try:
        done = subprocess.run([python, "-c", TORCH_PROBE], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def select(scenarios: list[p.Scenario], only: str) -> list[p.Scenario]:
    wanted = [name for name in only.split(",") if name]
    return [s for s in scenarios if not wanted or s.name in wanted]


def describe(scenarios: Sequence[p.Scenario]) -> str:
    lines = []
    for s in scenarios:
        nodes = ", ".join(f"{n.node_id} --nproc-per-node {n.nproc} (-> {n.expected_nproc})"
                          + ("" if n.cuda_visible is None else f" CUDA_VISIBLE_DEVICES={n.cuda_visible}")
                          for n in s.nodes)
        lines.append(f"{s.name}: {s.label}, world size {s.world_size}, deadline {s.deadline_s:.0f}s; {nodes}")
    return "\n".join(lines)


def run(scenarios: Sequence[p.Scenario], smi: Smi, dry_run: bool, budget: float, stop: threading.Event,
        say: Callable[[str], None]) -> list[p.Result]:
    from tests.gpu.scenarios import run_one  # noqa: PLC0415 - the harness only when something runs
    from tests.gpu.scene import Context  # noqa: PLC0415

    # The check polls checkpoint directories while they are written: an unfinished save is expected there.
    logging.getLogger("agent.worker.checkpoint").setLevel(logging.ERROR)
    baseline = {} if dry_run else {normal_uuid(g.uuid): g.used_mib for g in smi.gpus()}
    ctx = Context(smi, dry_run, stop, time.monotonic() + budget, baseline, say)  # type: ignore[arg-type]
    return [run_one(spec, ctx) for spec in scenarios]


def main(argv: Sequence[str] | None = None, *, smi: Smi | None = None,
         torch_probe: Callable[[], dict | str] = probe_torch, environ: dict[str, str] | None = None,
         out: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    smi = smi or Smi()
    environ = dict(os.environ) if environ is None else environ

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.cpu_dry_run:
        scenarios = select(p.plan([], dry_run=True), args.only)
    else:
        gpus, how = smi.detect()
        visible, how_visible = visible_entries(environ, [g.uuid for g in gpus])
        if not gpus or not visible:
            out(f"no NVIDIA GPU found ({how if not gpus else how_visible}); nothing run")
            return 0
        scenarios = select(p.plan(visible), args.only)
    if args.list:
        out(describe(scenarios))
        return 0
    info = torch_probe()
    if isinstance(info, str):
        out(f"cannot import torch under {sys.executable}: {info}")
        return 2
    if not args.cpu_dry_run and not info["available"]:
        out(f"torch {info['torch']} under {sys.executable} cannot use CUDA (torch.cuda.is_available() is False) "
            f"while nvidia-smi lists {len(gpus)} GPU(s): run `bash tests/gpu/run.sh`, which installs a CUDA "
            "build of torch into .venv-gpu")
        return 2
    say(f"torch {info['torch']} (CUDA {info['cuda']}, NCCL {info['nccl']}); "
        + ("dry run: gloo on CPU" if args.cpu_dry_run else
           f"driver {smi.driver()}; {len(visible)} GPU(s): {', '.join(sorted({g.name for g in gpus}))}"))
    say(describe(scenarios))

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:  # only records; the waits act on it
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        results = run(scenarios, smi, args.cpu_dry_run, args.budget, stop, say)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    out(p.table(results))
    for result in results:
        for text in result.logs:
            say(text)
    if received:
        return 128 + received[0]
    return 1 if any(r.outcome == p.FAIL for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
