"""One process of the scale simulation (tests.bench.rdzv_sim): a share of the N participants.

    python -m tests.bench.rdzv_sim_worker ENDPOINTS NODES MAX_NODES FIRST COUNT

Runs participants FIRST .. FIRST+COUNT-1, each a real rendezvous.participant.Participant on
a thread of its own, all sharing one of this process's gRPC channels (an EtcdStore per 32 nodes: one
Watch stream carrying their watch ids, one LeaseKeepAlive stream carrying their refreshes), as the
agents of one host would not but as N hosts' agents load etcd: 2N leases, N presences, N
watch sets. Their leases are refreshed by one timer thread (tests.bench.rdzv_sim_ticker),
not two threads a node: one keep-alive per lease per refresh, as the agents would send. Each participant loops as an agent does: next_assignment, then poll until the
round moves on. Reads commands from stdin, one a line:

    start [S]                  every participant of this process joins, spread over S seconds
    add I                      a new participant I joins (a node added)
    kill I                     participant I revokes both its leases and stops (a node lost)
    leave I                    participant I leaves as a planned stop does (opens the next round)
    stats                      print this process's request counts and CPU seconds
    quit

and writes JSON lines to stdout: {"held": I, "round": R, "size": S, "t": monotonic} each
time a participant holds an assignment (CLOCK_MONOTONIC is shared by every process of the
machine), and {"stats": ...} answers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

from rendezvous.errors import JobFinishedError, RendezvousError
from rendezvous.etcd.store import EtcdStore
from rendezvous.participant import Participant
from rendezvous.protocol.notices import NoticeKind
from rendezvous.settings import Settings
from rendezvous.state import NodeRecord
from rendezvous.store import RequestCounter
from tests.bench.rdzv_sim_ticker import Ticker

_out = threading.Lock()
# An agent polls about once a second, but a poll asks etcd nothing (watch events arrive on
# the store's thread): here a longer one only spares the simulator's CPU. Commands wake it.
POLL = 30.0
NODES_PER_CHANNEL = 32


def emit(record: dict[str, object]) -> None:
    with _out:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


def node_id(i: int) -> str:
    return f"node-{i:05d}"


class Node:
    """One simulated agent: the rendezvous loop of agent/daemon without workers."""

    def __init__(self, store: EtcdStore, settings: Settings, index: int, ticker: Ticker) -> None:
        self.index = index
        self.p = Participant(store, settings, NodeRecord(node_id(index), "127.0.0.1", 8),
                             port_reserver=lambda: 29500, ticker=ticker)
        self.command = ""  # "kill" / "leave": taken by the node's own thread (Participant is single-threaded)
        self.thread = threading.Thread(target=self._run, daemon=True, name=node_id(index))

    def order(self, command: str) -> None:
        self.command = command
        self.p.wake()

    def _run(self) -> None:
        try:
            self.p.start(timeout=60)
            while not self._obey():
                a = self.p.next_assignment(timeout=600)
                emit({"held": self.index, "round": a.round, "size": len(a.members), "t": time.monotonic()})
                while not self._obey():
                    notice = self.p.poll(POLL)
                    if notice is None:
                        continue
                    if notice.kind is NoticeKind.LEASE_LOST:
                        emit({"lease_lost": self.index, "t": time.monotonic()})
                        self.p.rejoin(timeout=60)
                    if notice.kind in (NoticeKind.ROUND, NoticeKind.LEASE_LOST):
                        break
        except JobFinishedError:
            pass
        except RendezvousError as exc:
            emit({"error": self.index, "text": str(exc)})

    def _obey(self) -> bool:
        """Act on a command; True once this node is gone."""
        if self.command == "kill":  # as a crashed host: no round opened, its keys vanish at once
            self.p.leases.close(revoke=True)
            self.p.close()
        elif self.command == "leave":
            self.p.leave("planned leave")
        return bool(self.command)


def main(argv: list[str]) -> int:
    endpoints, nodes, max_nodes, first, count = argv[0], *map(int, argv[1:5])
    logging.basicConfig(level=os.environ.get("RDZV_SIM_LOG", "ERROR"), format="%(levelname)s %(name)s: %(message)s")
    # min 1: the first round closes on the last call, so a lost node and a planned leave
    # re-form the job rather than wait for a replacement.
    settings = Settings(job_id="sim", min_nodes=1, max_nodes=max_nodes)
    threading.stack_size(512 * 1024)  # thousands of node threads: their stacks are mostly idle
    # A channel per NODES_PER_CHANNEL nodes, all counting into one counter. etcd answers a
    # keep-alive stream's requests in order, and the refresh of a lease that expired waits
    # there until etcd has revoked it (its lessor.Renew): on one stream carrying hundreds
    # of nodes' leases, one lapse would stall every other node's refreshes behind it.
    counter = RequestCounter()
    stores = [EtcdStore(endpoints, retry_for=30.0, counter=counter)
              for _ in range(max(1, -(-count // NODES_PER_CHANNEL)))]
    ticker = Ticker(workers=256)  # a refresh waiting on etcd must not hold up the others
    nodes_here = {i: Node(stores[i % len(stores)], settings, i, ticker) for i in range(first, first + count)}
    cpu0 = os.times()
    for line in sys.stdin:
        word, _, arg = line.strip().partition(" ")
        if word == "start":  # evenly over the ramp, as a cluster's agents start within seconds
            began, ramp = time.monotonic(), float(arg or 0)
            for k, node in enumerate(nodes_here.values()):
                time.sleep(max(0.0, began + ramp * k / len(nodes_here) - time.monotonic()))
                node.thread.start()
        elif word == "add":
            node = nodes_here[int(arg)] = Node(stores[0], settings, int(arg), ticker)
            node.thread.start()
        elif word in ("kill", "leave"):
            nodes_here[int(arg)].order(word)
        elif word == "stats":
            cpu = os.times()
            emit({"stats": counter.snapshot(),
                  "cpu": cpu.user + cpu.system - cpu0.user - cpu0.system, "threads": threading.active_count(),
                  "ticker": ticker.lateness()})
        elif word == "quit":
            break
    for node in nodes_here.values():
        node.command = node.command or "quit"
        node.p.wake()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
