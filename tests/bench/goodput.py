"""Goodput of a helper job through one random fault a minute: the in-process job of the
benchmark (docs/examples/train_ddp.py --inprocess under elastic-agent, 1 worker per node, gloo,
~0.1 s a step, a checkpoint every 10 steps, min 2 nodes, max 4) on this machine.

    python -m tests.bench.goodput [--minutes 10] [--seed 1] [--faults mixed|kill|sigterm|join]

3 nodes start; once the job trains the window opens, and in each minute of it one fault
strikes at a random second (15 to 45): ``kill`` (kill -9 of a random node, its agent and
workers), ``sigterm`` (SIGTERM to a random node's agent: a preemption with notice) or
``join`` (a new node's agent is started). ``mixed`` picks one of the three at random each
minute. The world size is kept within min and max: with 2 nodes left the fault is a join,
with 4 it is a kill or a SIGTERM (each event printed says which it was). Everything random
comes from ``--seed`` (printed), so a run can be repeated.

Goodput = useful training time / wall time of the window = (wall - time lost to faults) / wall:
  time lost to a fault = its pause (the longest gap in the stream of completed steps from the
      last step before the fault to the next fault or the window's end, less one ordinary
      step; a job that never trains again loses all of it) + the steps it made the job train
      again (completed steps lost, each at one ordinary step);
  an ordinary step = the median interval between two consecutive completed steps in the window.
Steps that are merely slow (the machine is shared; a step is paced to ~0.1 s) are useful time.
The pace-based figure printed beside it, steps kept x ordinary step / wall, also counts every
slow step as lost: on a quiet machine the two agree; the gap between them is the machine.
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass

from tests.e2e.harness import PYTHON, TRAIN, AgentProc, Cluster, wait_until

CMD = [PYTHON, str(TRAIN), "--steps", "10000000", "--checkpoint-every", "10", "--inprocess"]
MIN_NODES, MAX_NODES = 2, 4
STALL_S = 90.0  # no step for this long: the job is stuck, the run stops and says so


@dataclass
class Fault:
    at: float  # time.monotonic()
    kind: str
    node: str
    world: int  # the world size the job should go on at
    resumed_s: float | None = None
    lost: int | None = None
    gap_s: float = 0.0  # the longest pause in the step stream from the fault to the next one


class Job:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.n = 0
        self.live: list[AgentProc] = []

    def add(self) -> AgentProc:
        agent = self.cluster.start_agent(f"node-{self.n}", nproc=1, min_nodes=MIN_NODES, max_nodes=MAX_NODES,
                                         command=CMD)
        self.n += 1
        self.live.append(agent)
        return agent

    def strike(self, kind: str, rng: random.Random) -> Fault:
        self.live = [a for a in self.live if a.proc.poll() is None]
        if kind == "join":
            agent = self.add()
            return Fault(time.monotonic(), kind, agent.node_id, len(self.live))
        victim = rng.choice(self.live)
        self.live.remove(victim)
        at = time.monotonic()
        if kind == "kill":
            victim.kill_node(with_workers=True)
        else:
            victim.signal(signal.SIGTERM)  # it drains and exits 3 on its own
        return Fault(at, kind, victim.node_id, len(self.live))


def pick(faults: str, live: int, rng: random.Random) -> str:
    kind = rng.choice(["kill", "sigterm", "join"]) if faults == "mixed" else faults
    if live <= MIN_NODES:
        return "join"
    if live >= MAX_NODES and kind == "join":
        return rng.choice(["kill", "sigterm"])
    return kind


def settle(fault: Fault, steps: list[tuple[float, int, int]], until: float) -> None:
    """The fault's pause; when training went on at its world size, and the completed steps lost."""
    times = [max((t for t, _, _ in steps if t <= fault.at), default=fault.at),
             *(t for t, _, _ in steps if fault.at < t <= until), until]
    fault.gap_s = max(b - a for a, b in zip(times, times[1:]))
    resumed = next(((t, s) for t, s, w in steps if fault.at < t < until and w == fault.world), None)
    if resumed is None:
        return
    fault.resumed_s = resumed[0] - fault.at
    last = max((s for t, s, w in steps if t < resumed[0]), default=resumed[1] - 1)
    fault.lost = max(0, last + 1 - resumed[1])


def last_step(steps: list[tuple[float, int, int]], t: float) -> int:
    return max((s for when, s, w in steps if when <= t), default=-1)


def run(minutes: float, seed: int, faults: str) -> int:
    rng = random.Random(seed)
    print(f"goodput run: {minutes:g} min, one {faults} fault a minute, seed {seed}", flush=True)
    with Cluster(job_id="goodput") as cluster:
        job = Job(cluster)
        t0 = time.monotonic()
        for _ in range(3):
            job.add()
        wait_until(lambda: cluster.first_step_after(t0, 3), 180, "training at world size 3")
        time.sleep(5.0)
        opened = time.monotonic()
        closes = opened + 60 * minutes
        done: list[Fault] = []
        stalled = False
        for minute in range(int(minutes)):
            strike_at = opened + 60 * minute + rng.uniform(15, 45)
            while time.monotonic() < strike_at and not stalled:
                time.sleep(0.5)
                latest = max((t for t, _, _ in cluster.steps()), default=opened)
                stalled = time.monotonic() - latest > STALL_S
            if stalled:
                break
            live = len([a for a in job.live if a.proc.poll() is None])
            fault = job.strike(pick(faults, live, rng), rng)
            done.append(fault)
            print(f"  {fault.at - opened:6.1f}s {fault.kind:7s} {fault.node} -> world size {fault.world}", flush=True)
        while time.monotonic() < closes and not stalled:
            time.sleep(0.5)
        closes = min(closes, time.monotonic())
        steps = [s for s in cluster.steps() if s[0] <= closes]
    for i, fault in enumerate(done):
        settle(fault, steps, done[i + 1].at if i + 1 < len(done) else closes)
    return report(steps, done, opened, closes, seed, stalled)


def report(steps: list[tuple[float, int, int]], done: list[Fault], opened: float, closes: float, seed: int,
           stalled: bool) -> int:
    window = [(t, s) for t, s, _ in steps if opened <= t <= closes]
    gaps = [b[0] - a[0] for a, b in zip(window, window[1:]) if b[1] == a[1] + 1]
    step_s = statistics.median(gaps) if gaps else float("nan")
    kept = last_step(steps, closes) - last_step(steps, opened)
    wall = closes - opened
    lost_s = sum(max(0.0, f.gap_s - step_s) + (f.lost or 0) * step_s for f in done)
    goodput = (wall - lost_s) / wall
    print("\nfault     node     world  at that world size after (s)  pause (s)  completed steps lost")
    for f in done:
        again = f"{f.resumed_s:.2f}" if f.resumed_s is not None else "not seen"
        print(f"{f.kind:9s} {f.node:8s} {f.world:5d}  {again:>28s}  {f.gap_s:9.2f}  "
              f"{f.lost if f.lost is not None else '-':>20}")
    pauses = [f.resumed_s for f in done if f.resumed_s is not None]
    print(f"\nwall time of the window      {wall:.1f} s" + (" (stopped early: no step for 90 s)" if stalled else ""))
    print(f"ordinary step                {step_s:.4f} s (median interval between consecutive steps)")
    print(f"time lost to faults          {lost_s:.1f} s")
    print(f"steps kept                   {kept} (steps printed in the window: {len(window)})")
    print(f"completed steps lost         {sum(f.lost or 0 for f in done)}")
    if pauses:
        print(f"at the new world size, median {statistics.median(pauses):.2f} s (max {max(pauses):.2f} s)")
    print(f"pace-based: steps kept x ordinary step / wall = {100 * kept * step_s / wall:.1f} %")
    print(f"goodput = (wall - time lost to faults) / wall = {100 * goodput:.1f} %  (seed {seed})")
    return 1 if stalled else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the window, one fault a minute")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--faults", choices=("mixed", "kill", "sigterm", "join"), default="mixed")
    args = parser.parse_args(argv)
    return run(args.minutes, args.seed, args.faults)


if __name__ == "__main__":
    sys.exit(main())
