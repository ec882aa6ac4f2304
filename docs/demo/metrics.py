"""One agent's ``/metrics``, read the way a Prometheus would, reduced to what the demo shows."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    state: str = "-"
    world_size: int = 0
    round: int = 0
    group_rank: int = -1
    last_step: int = -1
    restarts: dict[str, int] = field(default_factory=dict)  # reason -> count, nonzero only
    goodput: float | None = None       # elastic_agent_goodput_ratio: this node
    job_goodput: float | None = None   # elastic_agent_job_goodput_ratio: the group-rank-0 agent only


def parse(text: str) -> Scrape:
    values: dict[str, float] = {}
    state = "-"
    restarts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "elastic_agent_state":
                if sample.value == 1:
                    state = sample.labels["state"]
            elif sample.name == "elastic_agent_worker_group_restarts_total":
                if sample.value:
                    restarts[sample.labels["reason"]] = int(sample.value)
            else:
                values[sample.name] = sample.value
    return Scrape(
        state=state,
        world_size=int(values.get("elastic_agent_world_size_nodes", 0)),
        round=int(values.get("elastic_agent_round", 0)),
        group_rank=int(values.get("elastic_agent_group_rank", -1)),
        last_step=int(values.get("elastic_agent_last_step", -1)),
        restarts=restarts,
        goodput=values.get("elastic_agent_goodput_ratio"),
        job_goodput=values.get("elastic_agent_job_goodput_ratio"),
    )


def scrape(port: int, timeout: float = 1.0) -> Scrape | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            return parse(r.read().decode())
    except (OSError, ValueError, urllib.error.URLError):
        return None


class Scraper:
    """Scrapes every running node twice a second in a thread of its own; keeps each node's last
    good scrape (an agent that exited keeps the values it ended with)."""

    def __init__(self, ports: Callable[[], dict[str, int]], interval: float = 0.5) -> None:
        self._ports = ports
        self._interval = interval
        self.latest: dict[str, Scrape] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def start(self) -> Scraper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            for node_id, port in self._ports().items():
                got = scrape(port)
                if got is not None:
                    self.latest[node_id] = got
            self._stop.wait(max(0.0, self._interval - (time.monotonic() - began)))
