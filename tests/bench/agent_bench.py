"""Recovery benchmark of elastic-agent: the 3-node gloo DDP job of issue 5, on this machine.

    python -m tests.bench.agent_bench [--repeat 3]

Scenarios, each on a fresh etcd and fresh agents (nproc 1 per node, ~0.1 s a step,
checkpoint every 10 steps, default settings):
  start        all three agents started -> first training step
  kill         kill -9 of a non-master node (agent and workers) -> first step on the survivors
  kill_master  kill -9 of the group-rank-0 node (hosts MASTER_ADDR) -> first step on the survivors
  scale_up     a 4th agent started -> first step at world size 4
Also the agent's RSS and CPU use while the job trains (nothing else for it to do).
Prints one line per measurement and a JSON summary of medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from tests.e2e.harness import PYTHON, TRAIN, Cluster, cpu_seconds, rss_mib, wait_until

CMD = [PYTHON, str(TRAIN), "--steps", "100000", "--checkpoint-every", "10"]


def one_run(results: dict[str, list[float]]) -> None:
    with Cluster(job_id="bench") as c:
        t0 = time.monotonic()
        agents = [c.start_agent(f"node-{i}", nproc=1, command=CMD) for i in range(3)]
        first = wait_until(lambda: c.first_step_after(t0, 3), 120, "first step")
        results["start"].append(first[0] - t0)
        # Idle cost: the job trains, the agents only watch.
        time.sleep(1.0)
        pid = agents[0].pid
        cpu0, w0 = cpu_seconds(pid), time.monotonic()
        time.sleep(5.0)
        results["agent_cpu_percent"].append(100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - w0))
        results["agent_rss_mib"].append(max(rss_mib(a.pid) for a in agents))
        # A 4th node joins.
        added = time.monotonic()
        c.start_agent("node-3", nproc=1, command=CMD)
        grown = wait_until(lambda: c.first_step_after(added, 4), 120, "world size 4")
        results["scale_up"].append(grown[0] - added)
        wait_until(lambda: all(a.group_rank() is not None for a in c.agents.values()), 30, "ranks")
        # kill -9 a non-master node, then the master.
        for name, rank in (("kill", 3), ("kill_master", 0)):
            live = [a for a in c.agents.values() if a.proc.poll() is None]
            size = len(live)
            wait_until(lambda: c.first_step_after(time.monotonic() - 0.5, size), 60, "steady training")
            victim = next(a for a in live if a.group_rank() == rank)
            killed = time.monotonic()
            victim.kill_node()
            resumed = wait_until(lambda: c.first_step_after(killed, size - 1), 120, f"resume after {name}")
            results[name].append(resumed[0] - killed)
            for a in c.agents.values():
                if a.proc.poll() is None:
                    wait_until(lambda a=a: a.group_rank() is not None, 30, "new ranks")
            time.sleep(1.0)  # let the new round's ranks settle in the logs before the next victim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {k: [] for k in
                                       ("start", "scale_up", "kill", "kill_master", "agent_rss_mib",
                                        "agent_cpu_percent")}
    for i in range(args.repeat):
        one_run(results)
        print(f"run {i + 1}: " + ", ".join(f"{k}={v[-1]:.2f}" for k, v in results.items()), flush=True)
    summary = {k: round(statistics.median(v), 2) for k, v in results.items()}
    summary["runs"] = args.repeat
    print(json.dumps({"median": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
