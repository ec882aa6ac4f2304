"""``make bench-fsdp``, third table: kill -9 of a node of an FSDP2 job under real agents, and a
node joining, timed from the outside as a user sees them.

    python -m tests.bench.fsdp_agent_bench [--width 7000] [--repeat 3]

Real etcd, real agents started as the README shows (``elastic-agent start`` with default
flags, 2 nodes x 2 workers, one working directory), the sharded example
``docs/examples/train_fsdp.py --loop run`` (``el.run``: in-memory snapshots at the default
cadence, every step, or every 10th with ``--hsdp``; recovery in process), gloo on CPU.
``--width 7000`` makes a 49M-parameter model with Adam.
Each repetition, on a fresh etcd and fresh agents:

- kill -9, at a random point of a step: the process group of the node that is not group rank 0
  (its agent and its workers)
  -> "state back", the first worker's log line that its state is rebuilt (detection, the new
  round, the new group, the shards re-sharded from the survivors' memory), and "training", the
  first step line at world size 2 (one step more); completed steps lost: the last step printed
  before the kill minus the step the job went on after;
- join: a third agent started -> the first step at world size 4 (its interpreter, the round,
  the new group, the newcomers fetching their shards, one step), and how long training paused
  for it: from the last step at world size 2 to every rank's state back, and to the first step
  at 4 (the newcomer's agent and interpreter start before the pause, while the job trains).

Prints one line per measurement and the medians.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from tests.e2e.harness import PYTHON, Cluster, wait_until

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "train_fsdp.py"
WAIT = 180.0
# The example behind the helper's INFO log, so that its "resumed from the in-memory shards"
# line (when the state was back, before the first step at the new size) reaches the console.
LOGGED = """\
import logging, runpy, sys
logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
logging.getLogger("agent.worker.sharded_memory").setLevel(logging.INFO)
sys.argv[0] = {example!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""
RESUMED = "resumed from the in-memory shards"


def command(cluster: Cluster, width: int, hsdp: bool) -> list[str]:
    script = cluster.workdir / "train_fsdp_logged.py"
    script.write_text(LOGGED.format(example=str(EXAMPLE)))
    return [PYTHON, str(script), "--loop", "run", "--steps", "1000000", "--width", str(width),
            "--checkpoint-every", "0", *(["--hsdp"] if hsdp else [])]


def state_back(cluster: Cluster, since: float, until: float) -> float:
    """When the last worker said its state was back, between ``since`` and ``until``."""
    return max((line.t for agent in cluster.agents.values() for line in list(agent.lines)
                if since < line.t <= until and RESUMED in line.text), default=float("nan"))


def params(width: int) -> int:
    return 16 * width + width + width * width + width + width * 4 + 4  # the example's three Linear layers


def one_run(width: int, hsdp: bool, results: dict[str, list[float]], rng: random.Random) -> None:
    with Cluster(job_id="bench-fsdp") as cluster:
        agents = [cluster.start_agent(f"node-{i}", nproc=2, min_nodes=1, max_nodes=2, command=command(cluster, width, hsdp))
                  for i in range(2)]
        started = time.monotonic()
        wait_until(lambda: len([s for t, s, ws in cluster.steps() if ws == 4]) >= 8, WAIT, "8 steps at world size 4")
        results["start"].append(cluster.first_step_after(started, 4)[0] - started)  # type: ignore[index]
        period = [t for t, s, ws in cluster.steps() if ws == 4][-6:]
        results["step s"].append((period[-1] - period[0]) / (len(period) - 1))
        wait_until(lambda: all(a.group_rank() is not None for a in agents), 30, "group ranks")
        lost = next(a for a in agents if a.group_rank() != 0)
        # A preemption lands anywhere in a step, not just after one is printed (where the last
        # snapshot is always still in flight): a random point of the next step.
        time.sleep(rng.uniform(0.0, results["step s"][-1]))
        killed = time.monotonic()
        lost.kill_node()
        back = wait_until(lambda: cluster.first_step_after(killed, 2), WAIT, "training at world size 2")
        before = max(s for t, s, ws in cluster.steps() if t < killed)
        results["kill -9 -> state back"].append(state_back(cluster, killed, back[0]) - killed)
        results["kill -9 -> training"].append(back[0] - killed)
        results["completed steps lost"].append(max(0, before - (back[1] - 1)))
        print(f"kill -9 -> a step at world size 2 in {back[0] - killed:.2f} s; last step before {before}, "
              f"went on at {back[1]}", flush=True)
        joined = time.monotonic()
        cluster.start_agent("node-2", nproc=2, min_nodes=1, max_nodes=2, command=command(cluster, width, hsdp))
        grown = wait_until(lambda: cluster.first_step_after(joined, 4), WAIT, "training at world size 4 again")
        results["join -> training"].append(grown[0] - joined)
        last = max(t for t, s, ws in cluster.steps() if ws == 2 and t < grown[0])
        results["join: paused to state back"].append(state_back(cluster, last, grown[0]) - last)
        results["join: paused to a step"].append(grown[0] - last)
        print(f"join -> a step at world size 4 in {grown[0] - joined:.2f} s; from the last step at world size 2: "
              f"state back in {state_back(cluster, last, grown[0]) - last:.2f} s, a step in {grown[0] - last:.2f} s",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=7000, help="the example's hidden width (default 7000: 49M)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hsdp", action="store_true", help="the example's HSDP mesh (a replica per node)")
    parser.add_argument("--seed", type=int, default=0, help="where in a step each kill lands")
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {k: [] for k in (
        "start", "step s", "kill -9 -> state back", "kill -9 -> training", "completed steps lost",
        "join -> training", "join: paused to state back", "join: paused to a step")}
    rng = random.Random(args.seed)
    for _ in range(args.repeat):
        one_run(args.width, args.hsdp, results, rng)
    print(f"\n{'HSDP (2 replicas x 2 shards)' if args.hsdp else 'FSDP2'} under real agents, 2 nodes x 2 workers "
          f"(gloo, CPU), {params(args.width) / 1e6:.0f}M parameters "
          f"+ Adam, el.run (in-memory snapshots at the default cadence: every "
          f"{'10th step, a replica on the other node' if args.hsdp else 'step'}), medians of {args.repeat}")
    print(f"{'':27s} {'median':>8s} {'min':>7s} {'max':>7s}")
    for key, values in results.items():
        print(f"{key:27s} {statistics.median(values):8.2f} {min(values):7.2f} {max(values):7.2f}")
    lost = results["completed steps lost"]
    print(f"kills that lost a completed step: {sum(1 for n in lost if n)} of {len(lost)}"
          + (" (a kill in the push window: the dead node's snapshot of that step not yet on its peer)"
             if any(lost) and not args.hsdp else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
