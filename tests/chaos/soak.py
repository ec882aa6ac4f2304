"""The soak: a random but seeded sequence of kills (-9), SIGTERMs, freezes, joins and etcd
member restarts against 3 to 5 nodes of a job with min 2 and max 4, for a fixed time, while
docs/examples/train_ddp.py ``--inprocess`` (the helper's loop) trains to a known final step.
Then the faults stop, every host gets a node back, and the job must complete: the last step
is exactly the final one, the last checkpoint is of that step, and the runner checks the
invariants (etcd's whole history among them) as after every scenario.

The same seed gives the same sequence of decisions; what the job does in between (which node
holds rank 0 when a kill comes) is timing, so a run is reproducible in its faults, not in its
every line.
"""

from __future__ import annotations

import random
import re
import signal
import statistics
import time
from dataclasses import dataclass, field

from agent.worker.checkpoint import latest_step
from tests.chaos.scenarios import Measured
from tests.chaos.world import NODE_HOSTS, World, train
from tests.e2e.harness import AgentProc
from tests.waiting import wait_until

FIRST_HOSTS = NODE_HOSTS[:3]
LIVE_FLOOR = 2  # min nodes: never fault below it, or the job rightly waits
GAP_S = (5.0, 14.0)  # between two faults
FREEZE_S = (3.0, 14.0)  # shorter and longer than the lease TTL
KINDS = ("kill", "sigterm", "freeze", "join", "etcd")
FINISH_WAIT_S = 300.0
# A node killed, SIGTERMed or frozen goes silent to its peers' probes too: a removal of it as
# unreachable (issue 24) is due within this long of the fault (of the thaw, for a freeze).
# Any other removal as unreachable is a false one: the soak never touches the network.
SILENT_SLACK_S = 20.0
UNREACHABLE_RE = re.compile(r"opened round (\d+): unreachable: (.+?) \(its ring neighbours")


@dataclass
class Host:
    name: str
    agent: AgentProc | None = None
    frozen: list[int] = field(default_factory=list)
    thaw_at: float = 0.0
    leaving: bool = False
    starts: int = 0


class Soak:
    def __init__(self, world: World, seed: int, seconds: float, steps: int) -> None:
        self.world = world
        self.rng = random.Random(seed)
        self.seed = seed
        self.seconds = seconds
        self.steps = steps
        self.hosts = {name: Host(name) for name in NODE_HOSTS}
        self.events: list[str] = []
        self.silent: dict[str, list[tuple[float, float]]] = {}  # node id -> (from, until) it may be silent
        self.command = train("--inprocess", steps=steps)

    # --- the hosts ------------------------------------------------------------------------
    def _running(self, h: Host) -> bool:
        return h.agent is not None and h.agent.proc.poll() is None

    def live(self) -> list[Host]:
        """Hosts whose node trains or can: running, not frozen, not leaving."""
        return [h for h in self.hosts.values() if self._running(h) and not h.frozen and not h.leaving]

    def free(self) -> list[Host]:
        return [h for h in self.hosts.values() if not self._running(h)]

    def start(self, h: Host) -> None:
        h.starts += 1
        h.leaving = False
        h.agent = self.world.start_node(h.name, f"{h.name}-{h.starts}", command=self.command)

    def _thaw_due(self, now: float, every: bool = False) -> None:
        for h in self.hosts.values():
            if h.frozen and (every or now >= h.thaw_at):
                AgentProc.thaw(h.frozen)
                h.frozen = []
                self._log(f"thaw {h.agent.node_id if h.agent else h.name}")

    def _reap(self) -> None:
        for h in self.hosts.values():
            if h.leaving and h.agent is not None and h.agent.proc.poll() is not None:
                code = h.agent.proc.returncode
                h.leaving = False
                if code != 3:
                    self.world.extra_violations.append(f"soak: {h.agent.node_id} SIGTERMed exited {code}, not 3")

    def _log(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self.t0:6.1f}s {what}")
        print(f"    {self.events[-1]}", flush=True)

    # --- one fault -------------------------------------------------------------------------
    def fault(self) -> None:
        kind = self.rng.choice(KINDS)
        pick = self.rng.random()  # drawn for every fault, so the sequence does not depend on timing
        length = self.rng.uniform(*FREEZE_S)
        live, free = self.live(), self.free()
        if kind in ("kill", "sigterm", "freeze") and len(live) <= LIVE_FLOOR:
            kind = "join" if free else "etcd"
        if kind == "join" and not free:
            kind = "etcd"
        if kind == "join":
            h = free[int(pick * len(free))]
            self.start(h)
            self._log(f"join {h.agent.node_id}")  # type: ignore[union-attr]
            return
        if kind == "etcd":
            member = self.world.etcd.members[int(pick * len(self.world.etcd.members))]
            self.world.etcd.restart(member)
            self._log(f"etcd member {member.name} killed and restarted")
            return
        h = live[int(pick * len(live))]
        assert h.agent is not None
        now = time.monotonic()
        until = now + (length if kind == "freeze" else 0.0) + SILENT_SLACK_S
        self.silent.setdefault(h.agent.node_id, []).append((now, until))
        if kind == "kill":
            h.agent.kill_node()
        elif kind == "sigterm":
            h.agent.signal(signal.SIGTERM)
            h.leaving = True
        else:
            h.frozen = h.agent.freeze()
            h.thaw_at = time.monotonic() + length
            kind = f"freeze {length:.1f}s"
        self._log(f"{kind} {h.agent.node_id}")

    # --- the run ---------------------------------------------------------------------------
    def run(self) -> Measured:
        self.t0 = time.monotonic()
        for name in FIRST_HOSTS:
            self.start(self.hosts[name])
        self.world.wait_training(len(FIRST_HOSTS), self.t0, 150.0)
        chaos_end = time.monotonic() + self.seconds
        next_fault = time.monotonic() + self.rng.uniform(*GAP_S)
        while time.monotonic() < chaos_end and not self._done():
            now = time.monotonic()
            self._thaw_due(now)
            self._reap()
            if now >= next_fault:
                self.fault()
                next_fault = time.monotonic() + self.rng.uniform(*GAP_S)
            time.sleep(0.1)  # the loop's tick: faults are due at times, not on conditions
        chaos_s = time.monotonic() - self.t0
        self._thaw_due(time.monotonic(), every=True)
        for h in self.free()[: max(0, 3 - len(self.live()))]:
            self.start(h)
            self._log(f"join {h.agent.node_id} (after the faults)")  # type: ignore[union-attr]
        wait_until(self._finished, FINISH_WAIT_S, f"the job to complete its {self.steps} steps", interval=0.2)
        self._reap()
        return self._measure(chaos_s)

    def _done(self) -> bool:
        return any(line.text.endswith("] done") for a in self.world.agents for line in list(a.lines)[-20:])

    def _finished(self) -> bool:
        return all(not self._running(h) for h in self.hosts.values() if not h.frozen)

    def _unreachable_removals(self) -> int:
        """Removals by the peer probes; a violation for each of a node no fault had silenced."""
        seen: set[int] = set()
        for agent in self.world.agents:
            for line in list(agent.lines):
                m = UNREACHABLE_RE.search(line.text)
                if not m or int(m.group(1)) in seen:
                    continue
                seen.add(int(m.group(1)))
                for node in m.group(2).split(", "):
                    if not any(a <= line.t <= b for a, b in self.silent.get(node, [])):
                        self.world.extra_violations.append(
                            f"soak: {node} removed as unreachable (round {m.group(1)}, "
                            f"+{line.t - self.t0:.1f}s) with no fault on it: a false removal")
        return len(seen)

    def _measure(self, chaos_s: float) -> Measured:
        tl = self.world.timeline()
        steps = [s.step for s in tl.steps]
        out = self.world.extra_violations
        for h in self.hosts.values():
            code = h.agent.proc.returncode if h.agent is not None else None
            if h.agent is not None and code not in (0, 3, -9):
                out.append(f"soak: {h.agent.node_id} exited {code} (expected 0 at the end, 3 or -9 by our doing)")
        if not self._done():
            out.append("soak: no rank 0 said done")
        if not steps or max(steps) != self.steps - 1:
            out.append(f"soak: the last step trained is {max(steps, default=None)}, not {self.steps - 1}")
        final = latest_step(self.world.cluster.checkpoint_dir)
        if final != self.steps - 1:
            out.append(f"soak: the latest complete checkpoint is of step {final}, not {self.steps - 1}")
        again = len(steps) - len(set(steps))
        gaps = [b.t - a.t for a, b in zip(tl.steps, tl.steps[1:]) if b.step == a.step + 1]
        pace = statistics.median(gaps) if gaps else float("nan")
        wall = tl.steps[-1].t - tl.steps[0].t if len(tl.steps) > 1 else float("nan")
        self.goodput = self.steps * pace / wall if wall == wall and wall > 0 else float("nan")
        longest = max((b.t - a.t for a, b in zip(tl.steps, tl.steps[1:])), default=0.0)
        faults = len([e for e in self.events if "thaw" not in e])
        removed = self._unreachable_removals()
        return Measured(longest, again, f"seed {self.seed}, {faults} faults in {chaos_s:.0f}s, "
                                        f"{removed} removals as unreachable, "
                                        f"goodput {self.goodput:.0%} ({self.steps} steps at {pace * 1000:.0f} ms "
                                        f"in {wall:.0f}s)")
