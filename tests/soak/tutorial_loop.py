"""Runs docs/examples/ddp_tutorial.py (PyTorch's DDP tutorial shape: the DDP model alive at
``destroy_process_group()``) as 3 agents with DEFAULT flags, RUNS times, each in a fresh
job, and prints how many finished: every agent exited 0 within DEADLINE_S seconds.

    python -m tests.soak.tutorial_loop [RUNS] [--deadline S] [-- EXTRA AGENT FLAGS]

A run that does not finish in time is stopped (by pid) and its agents' last lines printed.
``make soak-tutorial`` runs it 50 times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tests.e2e.harness import PYTHON, REPO, Cluster

TUTORIAL = REPO / "docs" / "examples" / "ddp_tutorial.py"


def one_run(index: int, deadline_s: float, extra: list[str]) -> tuple[bool, float, str]:
    with Cluster(job_id=f"tutorial-{index}") as cluster:
        command = [PYTHON, str(TUTORIAL), "3", "1", "--batch_size", "32",
                   "--snapshot_path", str(Path(cluster.workdir) / "snapshot.pt")]
        t0 = time.monotonic()
        agents = [cluster.start_agent(f"node-{i}", min_nodes=3, max_nodes=3, nproc=1, command=command,
                                      extra=extra) for i in range(3)]
        codes = []
        for agent in agents:
            left = max(0.1, deadline_s - (time.monotonic() - t0))
            try:
                codes.append(agent.wait(timeout=left))
            except Exception:  # noqa: BLE001 - a hung agent: the run did not finish
                codes.append(None)
        took = time.monotonic() - t0
        ok = codes == [0, 0, 0]
        detail = "" if ok else "\n".join(f"--- {a.node_id} exit {c}\n{a.text()[-2500:]}" for a, c in zip(agents, codes))
        return ok, took, detail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=int, nargs="?", default=50)
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds a run may take (default 120)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_args(argv[:cut]), argv[cut + 1:]
    finished = 0
    for index in range(args.runs):
        ok, took, detail = one_run(index, args.deadline, extra)
        finished += ok
        print(f"run {index + 1}: {'finished' if ok else 'DID NOT FINISH'} in {took:.1f}s", flush=True)
        if detail:
            print(detail, flush=True)
    print(f"{finished} of {args.runs} finished", flush=True)
    return 0 if finished == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
