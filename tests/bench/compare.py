"""elastic-agent against torchrun: the same job, the same failures, the same machine, one run.

    python -m tests.bench.compare [--repeat 3] [--png docs/recovery-timeline.png] [--torchrun-defaults]
                                  [--scenarios chain,freeze_handler]

The job: docs/examples/train_ddp.py, 3 nodes of 1 worker (gloo), ~0.1 s a step, a checkpoint
every 10 steps. torchrun runs the c10d rendezvous with the settings users tune for fast
recovery (last_call_timeout=1, keep_alive_interval=1, keep_alive_max_attempt=3, and
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, without which it crashes at its first membership change
with several agents on one host);
--torchrun-defaults adds torchrun with its defaults (slow: minutes per repetition).
"torchrun-etcd-v3" (``--launchers``) is torchrun on our etcd v3 rendezvous plug-in
(docs/torchrun-plugin.md) with the plug-in's defaults: same torchrun, no store inside an agent.
"elastic-agent-inprocess" is the same job under elastic-agent with ``--inprocess`` (the loop in
the helper: workers stay alive and re-form, state kept in memory, newcomers take it from a peer).
"torchft" is torchft 0.2.0 (tests/bench/torchft_launch.py: its Lighthouse, a quorum every step,
one replica group per node, the same model, data and pacing in tests/bench/torchft_job.py),
installed at run time into its own venv; when it cannot be installed or run, its column says
so and the error it printed is shown under the table.

One repetition per launcher is a chain of events on one job:
  start        3 nodes started                      -> first step
  scale_up     a 4th node started                   -> first step at world size 4
  sigterm      SIGTERM to a node (not the master)   -> first step at world size 3; steps lost
  kill         kill -9 of a node (not the store)    -> first step at world size 2
  (a node is added back, world size 3)
  freeze       SIGSTOP of a whole node (agent and workers, not the store): no socket closes
                                                    -> first step at world size 2
  (the frozen node is killed, a node is added back, world size 3)
  kill_store   kill -9 of the node hosting torchrun's c10d store (for elastic-agent: group
               rank 0, the master)                  -> first step at world size 2, or never
Scenario "freeze_handler" (``--scenarios``; elastic-agent and the torchrun launchers), on a job
of its own: 3 nodes running tests/bin/sigterm_handler_ddp.py, a plain DDP script whose SIGTERM
handler prints a line and exits (Lightning's habit), no checkpoints; SIGSTOP of a whole node
(not the store) -> first step at world size 2. The survivors' ranks sit in the all-reduce the
frozen peer left hanging, so their handler cannot run: only SIGKILL frees them.
Steps lost by a kill or a freeze = the last step printed before training resumed plus one,
minus the step it resumed at (0 when it resumed right after; a step completed but not printed
when its node died is not counted as lost). Node overhead = PSS summed over every process of
the node that is not a training worker (tests/bench/overhead.py), the highest node, at steady
training after the start and 2 s after each recovery.
A recovery not seen within --give-up seconds is "never". Steps lost by a SIGTERM = last step
completed before it minus the step training resumed from (a resume from a checkpoint of the
very step completed last loses none). Prints each measurement, then a table of medians, and
writes a PNG timeline (step against time, one line per launcher, events marked).
"""

from __future__ import annotations

import argparse
import math
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

from tests.bench import torchft_launch
from tests.bench.overhead import children, node_overhead
from tests.e2e.harness import (
    PYTHON,
    REPO,
    TRAIN,
    AgentProc,
    Cluster,
    cpu_seconds,
    free_port,
    listener_pid,
    rss_mib,
    wait_until,
)

CMD = [PYTHON, str(TRAIN), "--steps", "100000", "--checkpoint-every", "10"]
AGENT_CMD = {"elastic-agent": CMD, "elastic-agent-inprocess": CMD + ["--inprocess"]}
# Without it torchrun 2.13 crashes at its first membership change when several agents share a
# host (DistNetworkError in RendezvousStoreInfo.build: the shared agent store went away).
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
NEVER = math.inf
HANDLER_CMD = [PYTHON, str(REPO / "tests" / "bin" / "sigterm_handler_ddp.py")]
SCENARIOS = ("chain", "freeze_handler")
# In-process recovery and torchft run scripts written for them, not a plain script.
HANDLER_LAUNCHERS = ("elastic-agent", "torchrun", "torchrun-etcd-v3", "torchrun-default")


@dataclass
class Rep:
    launcher: str
    measures: dict[str, float] = field(default_factory=dict)
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, step)
    events: list[tuple[float, str]] = field(default_factory=list)
    rss_mib: float = math.nan
    cpu_percent: float = math.nan
    overhead: list[float] = field(default_factory=list)  # node overhead PSS (MiB), steady first
    unavailable: str = ""  # why this launcher could not run here, as it said
    scenario: str = "chain"


class Runner:
    def __init__(self, launcher: str, give_up: float) -> None:
        self.launcher = launcher
        self.give_up = give_up
        self.cluster = Cluster(job_id=f"cmp-{launcher}")
        self.rdzv_port = free_port()
        self.started: list[AgentProc] = []
        self.n = 0
        self.torchft: torchft_launch.Torchft | None = None
        self.script: list[str] | None = None  # the job's command instead of train_ddp.py

    def add(self) -> AgentProc:
        name = f"node-{self.n}"
        self.n += 1
        if self.launcher in AGENT_CMD:
            agent = self.cluster.start_agent(name, nproc=1, command=self.script or AGENT_CMD[self.launcher])
        elif self.torchft is not None:
            agent = self.torchft.start(name, self.n - 1)
        elif self.launcher == "torchrun-etcd-v3":
            command = self.script or CMD + ["--checkpoint-dir", str(self.cluster.checkpoint_dir)]
            agent = self.cluster.start_torchrun(name, command=command, backend="etcd-v3")
        else:
            command = self.script or CMD + ["--checkpoint-dir", str(self.cluster.checkpoint_dir)]
            agent = self.cluster.start_torchrun(name, rdzv_port=self.rdzv_port, command=command,
                                                tuned=self.launcher == "torchrun", extra_env=TORCHRUN_ENV)
        self.started.append(agent)
        return agent

    def live(self) -> list[AgentProc]:
        return [a for a in self.started if a.proc.poll() is None]

    def wait_step(self, after: float, world: int) -> float:
        try:
            hit = wait_until(lambda: self.cluster.first_step_after(after, world), self.give_up, "a step")
        except AssertionError:
            return NEVER
        return hit[0] - after  # type: ignore[index]

    def store_host(self) -> AgentProc:
        if self.launcher in AGENT_CMD:
            return next(a for a in self.live() if a.group_rank() == 0)
        if self.torchft is not None:  # no store host: the replica group of replica rank 0
            return torchft_launch.rank_zero(self.live())
        if self.launcher == "torchrun-etcd-v3":  # group rank 0 hosts global rank 0, which prints the steps
            return max(self.live(), key=lambda a: a.last_step_at())
        # Every torchrun on this host tries to host the c10d store; whichever bound the port does.
        host = listener_pid(self.rdzv_port)
        return next(a for a in self.live() if a.pid == host)

    def not_store_host(self) -> AgentProc:
        host = self.store_host()
        return next(a for a in reversed(self.live()) if a is not host)

    def sample_overhead(self, rep: Rep) -> None:
        """The node overhead of the costliest live node (PSS MiB), or NaN when unreadable."""
        found = []
        for a in self.live():
            workers = a.worker_pids() if self.launcher in AGENT_CMD else children(a.pid)  # torchrun's
            try:
                found.append(node_overhead(a.pid, workers).pss_mib)
            except (OSError, ValueError):
                continue
        rep.overhead.append(max(found, default=math.nan))

    def run(self) -> Rep:
        if self.launcher != "torchft":
            return self._run(Rep(self.launcher))
        rep = Rep(self.launcher)
        python, rep.unavailable = torchft_launch.ensure_env()
        if python is None:
            return rep
        self.torchft = torchft_launch.Torchft(self.cluster, python)
        try:
            return self._run(rep)
        finally:
            self.torchft.close()

    def run_freeze_handler(self) -> Rep:
        """Scenario freeze_handler (the module's docstring)."""
        rep = Rep(self.launcher, scenario="freeze_handler")
        self.script = HANDLER_CMD
        with self.cluster:
            t0 = time.monotonic()
            for _ in range(3):
                self.add()
            if self.wait_step(t0, 3) is NEVER:
                rep.measures["freeze_handler"] = NEVER
                return self._finish(rep, t0)
            time.sleep(2.0)
            victim = self.not_store_host()
            at = time.monotonic()
            rep.events.append((at - t0, "freeze"))
            frozen = victim.freeze()
            rep.measures["freeze_handler"] = self.wait_step(at, 2)
            victim.thaw(frozen)
            victim.kill_node(with_workers=True)
            return self._finish(rep, t0)

    def _lost(self, at: float, world: int) -> float:
        """Completed steps lost by the event at ``at`` (see the module's docstring)."""
        steps = self.cluster.steps()
        resumed = next(((t, s) for t, s, w in steps if t > at and w == world), None)
        if resumed is None:
            return NEVER
        last = max((s for t, s, w in steps if t < resumed[0]), default=resumed[1] - 1)
        return max(0, last + 1 - resumed[1])

    def _run(self, rep: Rep) -> Rep:
        c = self.cluster
        with c:
            t0 = time.monotonic()
            for _ in range(3):
                self.add()
            rep.measures["start"] = self.wait_step(t0, 3)
            if rep.measures["start"] is NEVER:
                return self._finish(rep, t0)
            time.sleep(1.0)
            pid = self.started[0].pid
            cpu0, w0 = cpu_seconds(pid), time.monotonic()
            time.sleep(4.0)
            rep.cpu_percent = 100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - w0)
            rep.rss_mib = max(rss_mib(a.pid) for a in self.live())
            self.sample_overhead(rep)

            at = time.monotonic()
            rep.events.append((at - t0, "node added"))
            self.add()
            rep.measures["scale_up"] = self.wait_step(at, 4)
            if rep.measures["scale_up"] is NEVER:
                return self._finish(rep, t0)
            done3 = max(s for t, s, w in c.steps() if w == 3)
            first4 = min(s for t, s, w in c.steps() if w == 4)
            rep.measures["scale_up_steps_lost"] = done3 + 1 - first4
            time.sleep(2.0)

            victim = self.not_store_host()
            before = max((s for t, s, w in c.steps()), default=-1)
            at = time.monotonic()
            rep.events.append((at - t0, "SIGTERM"))
            victim.signal(signal.SIGTERM)
            rep.measures["sigterm"] = self.wait_step(at, 3)
            # Steps completed at world size 4 (a drain completes one more after the SIGTERM).
            last_done = max((s for t, s, w in c.steps() if w == 4), default=before)
            resumed = [s for t, s, w in c.steps() if t > at and w == 3]
            rep.measures["sigterm_steps_lost"] = max(0, last_done + 1 - min(resumed)) if resumed else NEVER
            if rep.measures["sigterm"] is NEVER:
                return self._finish(rep, t0)
            victim.wait(timeout=60)
            time.sleep(2.0)
            self.sample_overhead(rep)

            victim = self.not_store_host()
            at = time.monotonic()
            rep.events.append((at - t0, "kill -9"))
            victim.kill_node(with_workers=True)
            rep.measures["kill"] = self.wait_step(at, 2)
            if rep.measures["kill"] is NEVER:
                return self._finish(rep, t0)
            rep.measures["kill_steps_lost"] = self._lost(at, 2)
            if not self._back_to_three(rep, t0):
                return self._finish(rep, t0)

            victim = self.not_store_host()
            at = time.monotonic()
            rep.events.append((at - t0, "freeze"))
            frozen = victim.freeze()
            rep.measures["freeze"] = self.wait_step(at, 2)
            if rep.measures["freeze"] is not NEVER:
                rep.measures["freeze_steps_lost"] = self._lost(at, 2)
            victim.thaw(frozen)
            victim.kill_node(with_workers=True)
            if rep.measures["freeze"] is NEVER or not self._back_to_three(rep, t0):
                return self._finish(rep, t0)

            victim = self.store_host()
            at = time.monotonic()
            rep.events.append((at - t0, "kill -9 store host"))
            victim.kill_node(with_workers=True)
            rep.measures["kill_store"] = self.wait_step(at, 2)
            if rep.measures["kill_store"] is not NEVER:
                rep.measures["kill_store_steps_lost"] = self._lost(at, 2)
            return self._finish(rep, t0)

    def _back_to_three(self, rep: Rep, t0: float) -> bool:
        at = time.monotonic()
        self.add()
        if self.wait_step(at, 3) is NEVER:
            return False
        time.sleep(2.0)
        self.sample_overhead(rep)
        return True

    def _finish(self, rep: Rep, t0: float) -> Rep:
        rep.timeline = [(t - t0, s) for t, s, w in self.cluster.steps()]
        return rep


ROWS = [
    ("start", "start to first step (s)"),
    ("kill", "kill -9 of a node -> resumed (s)"),
    ("kill_steps_lost", "completed steps lost by that kill -9"),
    ("kill_store", "kill -9 of the store host / rank 0 -> resumed (s)"),
    ("kill_store_steps_lost", "completed steps lost by that kill -9"),
    ("freeze", "a node frozen whole (SIGSTOP) -> resumed (s)"),
    ("freeze_steps_lost", "completed steps lost by that freeze"),
    ("freeze_handler", "a node frozen whole, plain script with a SIGTERM handler -> resumed (s)"),
    ("sigterm", "SIGTERM of a node -> resumed (s)"),
    ("sigterm_steps_lost", "completed steps lost by that SIGTERM"),
    ("scale_up", "node added -> training at the new size (s)"),
    ("scale_up_steps_lost", "completed steps lost by that scale-up"),
    ("overhead_steady", "node overhead beside the workers, PSS (MiB), steady"),
    ("overhead_max", "node overhead beside the workers, PSS (MiB), highest sample"),
    ("rss_mib", "agent RSS (MiB)"),
    ("cpu_percent", "agent CPU while training (% of a core)"),
]


def _median(values: list[float]) -> str:
    if not values:
        return "n/a"
    if any(v is NEVER for v in values):
        never = sum(v is NEVER for v in values)
        finite = [v for v in values if v is not NEVER]
        if never > len(values) / 2:
            return f"never ({never}/{len(values)} runs)"
        return f"{statistics.median(finite + [NEVER] * never):.2f} ({never} never)"
    return f"{statistics.median(values):.2f}"


def table(reps: list[Rep], launchers: list[str]) -> str:
    head = "| scenario | " + " | ".join(launchers) + " |"
    lines = [head, "|" + "---|" * (len(launchers) + 1)]
    ran = {r.scenario for r in reps}
    for key, title in ROWS:
        if (key if key == "freeze_handler" else "chain") not in ran:
            continue  # a scenario not selected (--scenarios)
        cells = []
        for launcher in launchers:
            if key == "freeze_handler" and launcher not in HANDLER_LAUNCHERS:
                cells.append("n/a")
                continue
            mine = [r for r in reps if r.launcher == launcher]
            if key in ("overhead_steady", "overhead_max", "rss_mib", "cpu_percent"):
                mine = [r for r in mine if r.scenario == "chain"]
            if any(r.unavailable for r in mine):
                cells.append("could not run (see below)")
                continue
            if key == "overhead_steady":
                values = [r.overhead[0] for r in mine if r.overhead]
            elif key == "overhead_max":
                values = [max(r.overhead) for r in mine if r.overhead]
            elif key == "rss_mib":
                values = [r.rss_mib for r in mine]
            elif key == "cpu_percent":
                values = [r.cpu_percent for r in mine]
            else:
                # A chain that ended early (a launcher that never recovered) did not reach the
                # later scenarios: those are not measured, not "never".
                values = [r.measures[key] for r in mine if key in r.measures]
            cells.append(_median(values) if values else "not reached")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    for launcher in launchers:
        why = next((r.unavailable for r in reps if r.launcher == launcher and r.unavailable), "")
        if why:
            lines.append(f"\n{launcher} could not run here: {why}")
    return "\n".join(lines)


def plot(reps: list[Rep], path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(10, 4.5))
    colours = {"elastic-agent": "tab:green", "torchrun": "tab:red", "torchrun-default": "tab:orange",
               "torchrun-etcd-v3": "tab:blue", "elastic-agent-inprocess": "tab:olive", "torchft": "tab:purple"}
    seen = set()
    for rep in reps:
        if rep.launcher in seen or not rep.timeline or rep.scenario != "chain":
            continue
        seen.add(rep.launcher)
        xs, ys = zip(*rep.timeline)
        ax.plot(xs, ys, ".", markersize=2, color=colours.get(rep.launcher), label=rep.launcher)
        for t, what in rep.events:
            ax.axvline(t, color=colours.get(rep.launcher), alpha=0.3, linestyle="--")
            ax.text(t, ax.get_ylim()[1] * 0.02, what, rotation=90, fontsize=7, color=colours.get(rep.launcher))
    ax.set_xlabel("seconds since the job started")
    ax.set_ylabel("training step")
    ax.set_title("Training progress through the same failures (first repetition of each launcher)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--give-up", type=float, default=60.0, help="seconds before a recovery counts as never")
    parser.add_argument("--png", default="docs/recovery-timeline.png")
    parser.add_argument("--torchrun-defaults", action="store_true")
    parser.add_argument("--launchers", default="elastic-agent,elastic-agent-inprocess,torchrun,torchrun-etcd-v3,torchft",
                        help="comma-separated: elastic-agent, elastic-agent-inprocess, torchrun (c10d, tuned), "
                             "torchrun-etcd-v3, torchft")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated: chain (every event on one job), freeze_handler")
    args = parser.parse_args(argv)
    launchers = args.launchers.split(",")
    if args.torchrun_defaults:
        launchers.append("torchrun-default")
    scenarios = args.scenarios.split(",")
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"--scenarios: unknown {', '.join(unknown)}; expected some of {', '.join(SCENARIOS)}")
    runs = [(s, launcher) for s in SCENARIOS if s in scenarios for launcher in launchers
            if s == "chain" or launcher in HANDLER_LAUNCHERS]
    reps: list[Rep] = []
    for i in range(args.repeat):
        for scenario, launcher in runs:
            try:
                runner = Runner(launcher, args.give_up)
                rep = runner.run() if scenario == "chain" else runner.run_freeze_handler()
            except Exception:  # noqa: BLE001 - one launcher's broken chain must not lose the others' figures
                traceback.print_exc()
                rep = Rep(launcher, scenario=scenario)
            reps.append(rep)
            shown = ", ".join(f"{k}={'never' if v is NEVER else f'{v:.2f}'}" for k, v in rep.measures.items())
            overhead = ",".join(f"{v:.0f}" for v in rep.overhead)
            if scenario == "chain":
                shown += f", rss={rep.rss_mib:.0f}MiB, cpu={rep.cpu_percent:.1f}%, overhead={overhead}MiB"
            print(f"[{i + 1}/{args.repeat}] {scenario} {launcher}: {shown}"
                  f"{', could not run: ' + rep.unavailable if rep.unavailable else ''}", flush=True)
    print()
    print(f"medians of {args.repeat} runs (this machine, same run):")
    print(table(reps, launchers))
    if args.png and "chain" in scenarios:
        plot(reps, args.png)
        print(f"\ntimeline written to {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
