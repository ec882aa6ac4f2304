"""The story the demo tells, one step at a time: start three nodes, kill one with ``kill -9``,
preempt another, let a fourth join, train to the end. Each step says what to look for, waits
(with a deadline) for what a user would see, and records what it cost."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from docs.demo.metrics import Scrape, Scraper
from docs.demo.nodes import ELASTIC_AGENT, Cluster, Node

T = TypeVar("T")


class Interrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM: stop everything now."""


class DemoFailed(Exception):
    """Something a user would call a bug: the demo says what it waited for."""


@dataclass
class Event:
    name: str          # "kill -9", "preemption", "join"
    node: str
    at: float          # time.monotonic()
    lost_s: float = 0.0
    detail: str = ""


@dataclass
class Result:
    t0: float
    first_step_t: float = 0.0
    end_t: float = 0.0
    events: list[Event] = field(default_factory=list)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    scrapes: dict[str, Scrape] = field(default_factory=dict)
    status: dict[str, Any] | None = None


class Display(Protocol):
    """The part of docs.demo.display the story uses."""

    def say(self, text: str) -> None: ...    # what is happening, and what to look for
    def event(self, text: str) -> None: ...  # one line of the event log
    def tick(self) -> None: ...              # called while waiting


class Story:
    def __init__(self, cluster: Cluster, scraper: Scraper, display: Display, stop: threading.Event,
                 t0: float) -> None:
        self.cluster = cluster
        self.scraper = scraper
        self.display = display
        self.stop = stop
        self.result = Result(t0=t0)
        self.leaving: set[str] = set()
        self.finishing = False

    # --- the story --------------------------------------------------------------------------
    def run(self) -> Result:
        c, job, r = self.cluster, self.cluster.job, self.result
        self.display.say("starting an embedded etcd on 127.0.0.1 (free ports, temporary data dir, auto-compaction)")
        c.start_etcd()
        self._check_stop()
        self.display.event(f"etcd up on {c.etcd.endpoint} (pid {c.etcd.proc.pid if c.etcd.proc else '?'})")
        for i in range(3):
            node = c.start_node(f"node-{i}")
            self.display.event(f"node-{i} started: elastic-agent pid {node.pid}, in {node.workdir}")
        self.display.say(f"3 agents meet in etcd, agree on a membership and start their workers ({job.describe()}): "
                         "watch the state go rendezvous -> running and world size reach 3")
        first = self.wait("training at world size 3", lambda: c.first_step_after(r.t0, world=3), 90)
        r.first_step_t = first.t
        self.display.event(f"training at world size 3, {first.t - r.t0:.1f} s after start")

        self._kill()
        self._preempt_then_join()

        stayers = [n for n in c.nodes.values() if not n.killed and n.exit_code() is None]
        self.display.say(f"training to the last step ({job.steps - 1}); when every member's workers "
                         "are done the job has succeeded and every agent exits 0")
        self.finishing = True
        self.wait("every agent to finish", lambda: all(n.exit_code() is not None for n in stayers), 90)
        r.end_t = time.monotonic()
        r.exit_codes = {n.node_id: n.exit_code() for n in c.nodes.values()}
        r.scrapes = dict(self.scraper.latest)
        bad = {n.node_id: n.exit_code() for n in stayers if n.exit_code() != 0}
        if bad:
            raise DemoFailed(f"agents exited non-zero at the end: {bad}")
        self.display.event(f"job succeeded: {', '.join(n.node_id for n in stayers)} exited 0")
        self.display.say("done: the job succeeded; asking etcd for the job's totals, then the summary")
        r.status = self._status()
        return r

    def _kill(self) -> None:
        c, r = self.cluster, self.result
        kill_at = 2 * c.job.checkpoint_every + 7  # a few steps past a checkpoint: a restart redoes some
        self.display.say(f"training at world size 3, a checkpoint every {c.job.checkpoint_every} steps; "
                         f"at step {kill_at} one node will be killed with kill -9")
        self.wait(f"step {kill_at}", lambda: self._step_at_least(kill_at), 60)
        victim = self._by_rank(lowest=True)
        role = " (group rank 0: it hosts the master address)" if self._rank(victim) == 0 else ""
        killed = time.monotonic()
        victim.kill()
        before = c.last_step_before(killed)  # the last step the job was seen to complete
        assert before is not None
        event = Event("kill -9", victim.node_id, killed)
        r.events.append(event)
        self.display.event(f"{victim.node_id} killed (kill -9) at step {before.value}{role}")
        if c.job.inprocess and c.job.sharded:
            self.display.say(f"{victim.node_id} killed: watch the others notice within ~2 s (its presence expires, "
                             "or a collective fails at once), re-form the process group at world size 2 in their "
                             f"running workers and re-shard the state from the copies of {victim.node_id}'s shards "
                             "kept on the other nodes: the last step, or the one before if its copy was in flight")
        elif c.job.inprocess:
            self.display.say(f"{victim.node_id} killed: watch the others notice within ~2 s (its presence expires, "
                             "or a collective fails at once), re-form the process group at world size 2 in their "
                             "running workers and go on from the last step they all completed, held in memory")
        else:
            self.display.say(f"{victim.node_id} killed: watch the others notice within ~2 s (its presence expires), "
                             "stop their workers and restart them at world size 2 from the last checkpoint")
        resumed = self.wait("training at world size 2 after the kill", lambda: c.first_step_after(killed, world=2), 60)
        back = self.wait(f"training past step {before.value} again",
                         lambda: c.first_step_after(killed, above=before.value), 30)
        event.lost_s = back.t - killed
        # Steps completed before the kill and trained again after it. Rank 0 prints a step once
        # every rank has updated its weights (the loss is reduced after the update), so the
        # survivors hold at least the last printed step; in process they may hold one more.
        lost = max(0, before.value + 1 - resumed.value)
        how = "in process" if c.job.inprocess else "from the checkpoint"
        event.detail = (f"survivors at world size 2 after {resumed.t - killed:.1f} s, went on at step "
                        f"{resumed.value} ({how}): {lost} steps lost")
        self.display.event(f"recovered: training at world size 2 after {resumed.t - killed:.1f} s, "
                           f"from step {resumed.value} ({how}; last step before the kill {before.value}): "
                           f"{lost} steps lost; back at step {back.value} after {event.lost_s:.1f} s")

    def _preempt_then_join(self) -> None:
        c, r = self.cluster, self.result
        preempt_at = 6 * c.job.checkpoint_every + 5  # between checkpoints: a hard stop would lose 5 steps
        self.display.say(f"2 nodes train on; at step {preempt_at} one of them is preempted (SIGTERM, as a "
                         "spot reclaim notice or systemd stop does)")
        before = self.wait(f"step {preempt_at}", lambda: self._step_at_least(preempt_at), 60)
        leaver = self._by_rank(lowest=False)
        stayer = next(n for n in self._running() if n is not leaver)
        self.leaving.add(leaver.node_id)
        asked = time.monotonic()
        leaver.proc.send_signal(signal.SIGTERM)
        self.display.event(f"{leaver.node_id} preempted (SIGTERM) at step {before.value}")
        stop = ("stops after the same next step (in process: the state stays in the stayer's memory)"
                if c.job.inprocess else "checkpoints at the same next step")
        self.display.say(f"{leaver.node_id} preempted: every worker {stop}, then {leaver.node_id} leaves with "
                         f"exit code 3. {stayer.node_id} alone is below --min-nodes {c.job.min_nodes}: it waits, "
                         "nothing is lost")
        self.wait(f"{leaver.node_id} to leave", lambda: leaver.exit_code() is not None, 60)
        left = time.monotonic()
        code = leaver.exit_code()
        drained = c.first_after(c.drains, asked)
        if code != 3 or drained is None:
            raise DemoFailed(f"{leaver.node_id} exited {code} (expected 3, after a drain)\n{leaver.tail()}")
        r.events.append(Event("preemption", leaver.node_id, asked, left - asked,
                              f"drained at step {drained.value}, exit 3"))
        self.display.event(f"{leaver.node_id} drained at step {drained.value} and exited 3 after "
                           f"{left - asked:.1f} s; {stayer.node_id} waits for a second node")

        joiner = c.start_node(f"node-{len(c.nodes)}")
        self.display.event(f"{joiner.node_id} joins: elastic-agent pid {joiner.pid}")
        source = (f"its workers receive the state from {stayer.node_id}'s, not from disk" if c.job.inprocess
                  else "every worker starts from the checkpoint of the drain")
        self.display.say(f"{joiner.node_id} joins (new capacity; {source}): watch training resume at step "
                         f"{drained.value + 1} with world size 2 - no completed step lost")
        resumed = self.wait("training after the join", lambda: c.first_step_after(left, world=2), 90)
        lost = drained.value + 1 - resumed.value  # completed before the drain, trained again after it
        r.events.append(Event("join", joiner.node_id, left, resumed.t - left,
                              f"resumed at step {resumed.value} with world size 2: {lost} steps lost"))
        self.display.event(f"resumed at step {resumed.value} with world size 2, {resumed.t - left:.1f} s after "
                           f"{joiner.node_id} started: {lost} steps lost")
        if lost:
            raise DemoFailed(f"the preemption lost {lost} steps: drained at {drained.value}, resumed at {resumed.value}"
                             f"\n{stayer.tail()}\n{joiner.tail()}")

    # --- helpers ----------------------------------------------------------------------------
    def wait(self, what: str, predicate: Callable[[], T | None], timeout: float) -> T:
        deadline = time.monotonic() + timeout
        while True:
            self._check_stop()
            got = predicate()
            if got:
                return got
            gone = [n for n in self._expected() if n.exit_code() is not None]
            if gone:
                raise DemoFailed(f"while waiting for {what}: {gone[0].node_id} exited {gone[0].exit_code()}\n"
                                 f"{gone[0].tail()}")
            if time.monotonic() > deadline:
                tails = "\n".join(n.tail(8) for n in self._running())
                raise DemoFailed(f"waited {timeout:.0f} s for {what}\n{tails}")
            self.display.tick()
            time.sleep(0.1)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted()

    def _step_at_least(self, step: int):
        last = self.cluster.last_step()
        return last if last is not None and last.value >= step else None

    def _running(self) -> list[Node]:
        return [n for n in self.cluster.nodes.values() if not n.killed and n.exit_code() is None]

    def _expected(self) -> list[Node]:
        """Nodes that must still run: all but the killed one and the one told to leave, until the end."""
        if self.finishing:
            return []
        return [n for n in self.cluster.nodes.values() if not n.killed and n.node_id not in self.leaving]

    def _rank(self, node: Node) -> int:
        got = self.scraper.latest.get(node.node_id)
        return got.group_rank if got else -1

    def _by_rank(self, *, lowest: bool) -> Node:
        ranked = sorted(self._running(), key=lambda n: (self._rank(n), n.node_id))
        return ranked[0] if lowest else ranked[-1]

    def _status(self) -> dict[str, Any] | None:
        """The job as etcd sees it, from ``elastic-agent status --json``."""
        c = self.cluster
        try:
            out = subprocess.run([*ELASTIC_AGENT, "status", "--etcd-endpoints", c.etcd.endpoint,
                                  "--job-id", c.job.job_id, "--json"], capture_output=True, text=True, timeout=20,
                                 stdin=subprocess.DEVNULL)
            return json.loads(out.stdout) if out.returncode == 0 else None
        except (subprocess.TimeoutExpired, json.JSONDecodeError):
            return None
