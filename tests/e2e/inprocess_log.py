"""What the worker helper's INFO log says in an in-process job, read from an agent's console:
the job command that shows that log (train_ddp.py ``--inprocess`` behind a user's own
``logging`` setup) and parsers for its re-formed, took-state and leave lines. Shared by the
in-process and the slow-agent end-to-end tests."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tests.e2e.harness import PYTHON, TRAIN, AgentProc, Cluster

_LOGGED_TRAIN = """\
import logging, runpy, sys
handler = logging.StreamHandler()
handler.setFormatter(logging.Formatter("pid %(process)d %(name)s %(levelname)s: %(message)s"))
helper = logging.getLogger("agent.worker")
helper.addHandler(handler)
helper.setLevel(logging.INFO)
sys.argv[0] = {train!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""
REFORMED_RE = re.compile(r"pid (\d+) agent\.worker\.inprocess INFO: re-formed in round (\d+) as rank (\d+) of (\d+) "
                         r"in [\d.]+s \((.*)\); going on after step (-?\d+)")
TOOK_RE = re.compile(r"pid (\d+) agent\.worker\.held INFO: took the state of step (\d+) from rank (\d+)")
LEFT_RE = re.compile(r"pid (\d+) agent\.worker\.inprocess INFO: stopped after step (\d+): this node leaves")


@dataclass(frozen=True)
class Reformed:
    """One worker's "re-formed in round R as rank r of W (why); going on after step H"."""

    pid: int
    round: int
    rank: int
    world: int
    why: str
    after: int


def inprocess_job(cluster: Cluster) -> list[str]:
    script = cluster.workdir / "train_logged.py"
    script.write_text(_LOGGED_TRAIN.format(train=str(TRAIN)))
    return [PYTHON, str(script), "--steps", "100000", "--checkpoint-every", "10", "--inprocess"]


def reformed(agent: AgentProc, world: int) -> list[Reformed]:
    found = []
    for line in list(agent.lines):
        m = REFORMED_RE.search(line.text)
        if m and int(m.group(4)) == world:
            found.append(Reformed(int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5),
                                  int(m.group(6))))
    return found


def took_state(agent: AgentProc) -> dict[int, tuple[int, int]]:
    """pid -> (step, source rank) of each of this node's workers that took the state from a peer."""
    return {int(m.group(1)): (int(m.group(2)), int(m.group(3)))
            for m in (TOOK_RE.search(line.text) for line in list(agent.lines)) if m}


def started_lines(agent: AgentProc) -> list[str]:
    return [line.text for line in list(agent.lines) if "workers (global ranks" in line.text]
