"""What a person watches: a live table (rich) on a terminal, or a plain line per update when
stdout is a pipe or a CI log. Both show the same things: per node its state, world size,
round, group rank and last step (from its ``/metrics``); what is happening and what to look
for; and a short log of events."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from docs.demo.metrics import Scraper
from docs.demo.nodes import Cluster, Node

STATE_STYLE = {"running": "bold green", "rendezvous": "yellow", "restarting": "yellow", "stopping": "yellow",
               "initializing": "dim", "starting": "dim", "succeeded": "cyan", "failed": "bold red",
               "stopped": "magenta"}


@dataclass(frozen=True)
class Row:
    node: str
    pid: int
    state: str
    world: str
    round: str
    rank: str
    step: str
    restarts: str
    goodput: str


def node_state(node: Node, scraper: Scraper) -> str:
    code = node.exit_code()
    if node.killed:
        return "killed (-9)"
    if code is not None:
        return {0: "exited 0 (done)", 3: "exited 3 (left)"}.get(code, f"exited {code}")
    got = scraper.latest.get(node.node_id)
    return got.state if got else "starting"


def rows(cluster: Cluster, scraper: Scraper) -> list[Row]:
    out = []
    for node in list(cluster.nodes.values()):
        got = scraper.latest.get(node.node_id)
        # A node that is gone is in no round: only what it last reached still means something.
        gone = node.killed or node.exit_code() not in (None, 0)
        known = got is not None and got.round > 0 and not gone
        out.append(Row(
            node=node.node_id, pid=node.pid, state=node_state(node, scraper),
            world=str(got.world_size) if known else "-",
            round=str(got.round) if known else "-",
            rank=str(got.group_rank) if known and got.group_rank >= 0 else "-",
            step=str(got.last_step) if got and got.last_step >= 0 else "-",
            restarts=str(sum(got.restarts.values())) if got else "-",
            goodput=f"{got.goodput:.0%}" if got and got.goodput is not None else "-",
        ))
    return out


class PlainDisplay:
    """A line per update: an event, a change of what to look for, a change of a node's state,
    world size or round, and the progress every few seconds."""

    def __init__(self, cluster: Cluster, scraper: Scraper, t0: float, out=None, every: float = 3.0) -> None:
        self.cluster, self.scraper, self.t0 = cluster, scraper, t0
        self.out = out or sys.stdout
        self.every = every
        self._last_key: tuple = ()
        self._last_print = 0.0

    def _print(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", file=self.out, flush=True)

    def start(self) -> None:
        self._print(f"work dir {self.cluster.root}")

    def say(self, text: str) -> None:
        self._print(f"NOW: {text}")

    def event(self, text: str) -> None:
        self._print(f"EVENT: {text}")

    def tick(self) -> None:
        table = rows(self.cluster, self.scraper)
        key = tuple((r.node, r.state, r.world, r.round) for r in table)
        now = time.monotonic()
        if key == self._last_key and now - self._last_print < self.every:
            return
        self._last_key, self._last_print = key, now
        last = self.cluster.last_step()
        head = (f"step {last.value}/{self.cluster.job.steps - 1} world {last.world}" if last else "no step yet")
        nodes = " | ".join(f"{r.node} {r.state} w{r.world} r{r.round} step {r.step}" for r in table)
        self._print(f"{head} | {nodes}")

    def close(self) -> None:
        pass

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)


class LiveDisplay:
    """A rich Live screen, refreshed four times a second from the latest scrapes."""

    def __init__(self, cluster: Cluster, scraper: Scraper, t0: float) -> None:
        from rich.console import Console  # noqa: PLC0415 - only a terminal needs rich
        from rich.live import Live  # noqa: PLC0415

        self.cluster, self.scraper, self.t0 = cluster, scraper, t0
        self.console = Console()
        self.now = "starting"
        self.events: list[tuple[float, str]] = []
        self.live = Live(console=self.console, get_renderable=self._render, refresh_per_second=4,
                         redirect_stdout=False, redirect_stderr=False)

    def start(self) -> None:
        self.live.start()

    def say(self, text: str) -> None:
        self.now = text

    def event(self, text: str) -> None:
        self.events.append((time.monotonic() - self.t0, text))

    def tick(self) -> None:
        pass  # Live refreshes itself

    def close(self) -> None:
        self.live.refresh()
        self.live.stop()

    def print(self, text: str = "") -> None:
        print(text, flush=True)  # after the live screen: plain lines, never re-wrapped

    def _render(self):
        from rich.console import Group  # noqa: PLC0415
        from rich.panel import Panel  # noqa: PLC0415
        from rich.progress_bar import ProgressBar  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415
        from rich.text import Text  # noqa: PLC0415

        job = self.cluster.job
        elapsed = time.monotonic() - self.t0
        table = Table(expand=False, box=None, padding=(0, 2), header_style="bold")
        for name, justify in (("node", "left"), ("pid", "right"), ("state", "left"), ("world size", "right"),
                              ("round", "right"), ("group rank", "right"), ("last step", "right"),
                              ("restarts", "right"), ("goodput", "right")):
            table.add_column(name, justify=justify)
        for r in rows(self.cluster, self.scraper):
            style = STATE_STYLE.get(r.state, "red" if "killed" in r.state else
                                    "magenta" if "exited 3" in r.state else "cyan")
            table.add_row(r.node, str(r.pid), Text(r.state, style=style), r.world, r.round, r.rank, r.step,
                          r.restarts, r.goodput)
        last = self.cluster.last_step()
        done = last.value + 1 if last else 0
        progress = Table.grid(padding=(0, 2))
        progress.add_row(Text(f"step {done}/{job.steps}", style="bold"), ProgressBar(total=job.steps, completed=done,
                         width=40), Text(f"world size {last.world if last else '-'}"))
        log = Text()
        for t, text in self.events[-7:]:
            log.append(f"{t:6.1f}s  ", style="dim")
            log.append(text + "\n")
        title = (f"elastic-agent demo: job {job.job_id!r}, --min-nodes {job.min_nodes} --max-nodes "
                 f"{job.max_nodes}, train_ddp.py ({job.steps} steps)  {elapsed:5.1f} s")
        return Panel(Group(
            progress, Text(""), table, Text(""),
            Text.assemble(("now: ", "bold yellow"), (self.now, "yellow")), Text(""),
            Text("events", style="bold"), log,
        ), title=title, title_align="left", subtitle=f"work dir {self.cluster.root}  (Ctrl-C stops everything)")
