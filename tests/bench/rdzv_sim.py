"""Scale simulation: N rendezvous participants over P processes against one etcd or three.

    python -m tests.bench.rdzv_sim --nodes 256 1024 4096 [--procs 8] [--ramp 2] [--cluster]

Loads etcd the way a cluster would: every participant is a real Participant with the default
--lease-ttl and --presence-ttl (its own two leases, presence and watches), spread over P
processes (tests.bench.rdzv_sim_worker), a gRPC channel per 32 of them; each process's lease
refreshes are driven by one timer thread (tests.bench.rdzv_sim_ticker), one keep-alive per
lease per refresh as the agents would send. Four scenarios, one after the other on the same job:

- first: every node joins (started evenly over --ramp seconds); the first round closes on the
  last call; timed from the last node's start;
- lost: one node's leases are revoked (a crashed host, without the presence TTL of detection);
  the survivors re-form;
- join: a node is added; as a standby it grows the job after --scale-up-cooldown;
- leave: one node leaves as a planned stop does (it opens the next round, then revokes).

Per scenario: seconds from the event until every live node holds the new assignment; etcd
requests per node (counted at the clients; keep-alives, a rate rather than a cost of the
round, apart); watch responses and bytes
etcd sent and received (its /metrics, summed over members), per node; etcd's CPU seconds; lease
grants against registrations and leases etcd expired (both must say no lease expired); the
simulator's CPU (busiest process, % of one core), how late its refreshes started and how long
etcd took to answer one, and etcd's applies over 100 ms: which of the two was the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from rendezvous.etcd.server import EtcdServer
from rendezvous.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
METRICS = {  # our name: (etcd metric, label filter)
    "watch_msgs": ("grpc_server_msg_sent_total", 'grpc_method="Watch"'),
    "sent_bytes": ("etcd_network_client_grpc_sent_bytes_total", ""),
    "recv_bytes": ("etcd_network_client_grpc_received_bytes_total", ""),
    "etcd_cpu": ("process_cpu_seconds_total", ""),
    "keepalives_rcvd": ("grpc_server_msg_received_total", 'grpc_method="LeaseKeepAlive"'),
    # etcd answers a keep-alive on the leader only once it has applied what it committed, so
    # applies that fall behind (> 100 ms each) hold up every refresh: a lease then expires
    # because etcd is slow, not because the simulator did not send.
    "slow_apply": ("etcd_server_slow_apply_total", ""),
    "expired": ("etcd_debugging_server_lease_expired_total", ""),
}


def scrape(urls: list[str]) -> dict[str, float]:
    """The METRICS summed over every member's /metrics."""
    total = dict.fromkeys(METRICS, 0.0)
    for url in urls:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        for line in text.splitlines():
            for ours, (name, label) in METRICS.items():
                if line.startswith(name) and label in line and line[len(name)] in " {":
                    total[ours] += float(line.rsplit(" ", 1)[1])
    return total


class Sim:
    """The P worker processes, and what they report."""

    def __init__(self, endpoints: str, nodes: int, procs: int) -> None:
        self.nodes, self.max_nodes = nodes, nodes + 1
        share = -(-nodes // procs)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "tests.bench.rdzv_sim_worker", endpoints, str(nodes),
                              str(self.max_nodes), str(first), str(min(share, nodes - first))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
            for first in range(0, nodes, share)
        ]
        self.share = share
        self.events: queue.Queue[dict] = queue.Queue()
        self.held: dict[int, tuple[int, int, float]] = {}  # node: (round, size, when)
        self.lease_lost = 0
        self.errors: list[str] = []
        for proc in self.procs:
            threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.events.put(json.loads(line))

    def send(self, proc_index: int, command: str) -> None:
        stdin = self.procs[proc_index].stdin
        assert stdin is not None
        stdin.write(command + "\n")
        stdin.flush()

    def owner(self, node: int) -> int:
        return min(node // self.share, len(self.procs) - 1)

    def _take(self, event: dict) -> dict | None:
        if "held" in event:
            self.held[event["held"]] = (event["round"], event["size"], event["t"])
        elif "lease_lost" in event:
            self.lease_lost += 1
        elif "error" in event:
            self.errors.append(f"node {event['error']}: {event['text']}")
        else:
            return event
        return None

    def wait_formed(self, live: set[int], after_round: int, timeout: float) -> tuple[int, float]:
        """Until every live node holds one round after ``after_round`` with all of them in it:
        (that round, when the last of them got it)."""
        deadline = time.monotonic() + timeout
        while True:
            rounds = {self.held.get(n, (0, 0, 0.0))[:2] for n in live}
            if len(rounds) == 1:
                (rnd, size), = rounds
                if rnd > after_round and size == len(live):
                    return rnd, max(self.held[n][2] for n in live)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"not formed after {timeout}s: rounds held {sorted(rounds)[:5]}; "
                               f"leases lost {self.lease_lost}; "
                                   f"errors {self.errors[:3]}")
            try:
                self._take(self.events.get(timeout=min(left, 1.0)))
            except queue.Empty:
                pass

    def stats(self) -> tuple[dict[str, int], list[float], dict[str, float]]:
        """Request counts summed over the processes, each process's CPU seconds so far, and
        how late its lease refreshes started since the last call (worst, and how many > 100 ms)."""
        for i in range(len(self.procs)):
            self.send(i, "stats")
        counts: dict[str, int] = {}
        cpu: list[float] = []
        late = {"late_max_s": 0.0, "late_over_100ms": 0, "errors": 0, "slow_max_s": 0.0}
        while len(cpu) < len(self.procs):
            answer = self._take(self.events.get(timeout=60))
            if answer is not None:
                for kind, n in answer["stats"].items():
                    counts[kind] = counts.get(kind, 0) + n
                cpu.append(answer["cpu"])
                ticker = answer["ticker"]
                late["late_max_s"] = max(late["late_max_s"], ticker["late_max_s"])
                late["slow_max_s"] = max(late["slow_max_s"], ticker["slow_max_s"])
                late["late_over_100ms"] += ticker["late_over_100ms"]
                late["errors"] += ticker["errors"]
        return counts, cpu, late

    def close(self) -> None:
        for i, proc in enumerate(self.procs):
            try:
                self.send(i, "quit")
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


class _NotFormed(Exception):
    pass


def run_size(urls: list[str], endpoints: str, nodes: int, procs: int, timeout: float, ramp: float) -> list[dict]:
    """The four scenarios at one size: a row each."""
    sim = Sim(endpoints, nodes, procs)
    rows: list[dict] = []
    live = set(range(nodes))
    registrations = 0
    try:
        def scenario(name: str, act: callable, starts: int, lag: float = 0.0) -> None:
            nonlocal registrations
            counts0, cpu0, _ = sim.stats()
            metrics0 = scrape(urls)
            after = max((sim.held.get(n, (0,))[0] for n in live), default=0)
            t0 = time.monotonic()
            wall0 = time.monotonic()
            act()
            registrations += starts
            try:
                rnd, t_formed = sim.wait_formed(live, after, timeout)
            except TimeoutError as exc:  # still a row: what etcd and the simulator did meanwhile
                print(f"# {nodes} nodes, {name}: {exc}", file=sys.stderr, flush=True)
                rnd, t_formed = -1, float("nan")
            wall = time.monotonic() - wall0
            counts1, cpu1, late = sim.stats()
            metrics1 = scrape(urls)
            delta = {k: metrics1[k] - metrics0[k] for k in METRICS}
            requests = sum(counts1.values()) - sum(counts0.values())
            # Keep-alives are a rate (~2.3 a second a node), not a cost of the round: apart.
            keepalives = counts1.get("lease_keepalive", 0) - counts0.get("lease_keepalive", 0)
            grants = counts1.get("lease_grant", 0)
            rows.append({
                "nodes": nodes, "scenario": name, "round": rnd, "seconds": round(t_formed - t0 - lag, 3),
                "requests_per_node": round((requests - keepalives) / len(live), 2),
                "keepalives_per_node": round(keepalives / len(live), 2),
                "keepalives": keepalives, "etcd_keepalives": int(delta["keepalives_rcvd"]),
                "keepalives_per_s": round(keepalives / wall),
                "etcd_keepalives_per_s": round(delta["keepalives_rcvd"] / wall),
                "watch_msgs": int(delta["watch_msgs"]),
                "watch_msgs_per_node": round(delta["watch_msgs"] / len(live), 2),
                "sent_kb_per_node": round(delta["sent_bytes"] / len(live) / 1024, 2),
                "recv_kb_per_node": round(delta["recv_bytes"] / len(live) / 1024, 2),
                "sent_mb": round(delta["sent_bytes"] / 2**20, 2),
                "etcd_cpu_s": round(delta["etcd_cpu"], 2),
                "grants": grants, "registrations": 2 * registrations,  # presence + membership lease
                "expired": int(metrics1["expired"]), "lease_lost": sim.lease_lost,
                "sim_cpu_max_pct": round(100 * max(b - a for a, b in zip(cpu0, cpu1)) / wall, 1),
                "sim_cpu_total_pct": round(100 * (sum(cpu1) - sum(cpu0)) / wall, 1),
                "refresh_late_max_s": late["late_max_s"], "refresh_late_over_100ms": late["late_over_100ms"],
                "refresh_errors": late["errors"], "refresh_slow_max_s": late["slow_max_s"],
                "etcd_slow_applies": int(delta["slow_apply"]), "load": round(os.getloadavg()[0], 1),
            })
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if rnd < 0:
                raise _NotFormed

        def start() -> None:
            for i in range(len(sim.procs)):
                sim.send(i, f"start {ramp}")

        # Timed from the last node's start: the ramp is how the agents were launched, not the round.
        scenario("first", start, nodes, lag=ramp)
        victim = nodes // 2  # in the middle of the ring: neither the first node nor the last
        live.discard(victim)
        scenario("lost", lambda: sim.send(sim.owner(victim), f"kill {victim}"), 0)
        newcomer = nodes
        live.add(newcomer)
        scenario("join", lambda: sim.send(0, f"add {newcomer}"), 1)
        leaver = nodes // 3
        live.discard(leaver)
        scenario("leave", lambda: sim.send(sim.owner(leaver), f"leave {leaver}"), 0)
    except _NotFormed:
        pass  # the rest of this size would measure the wreck
    finally:
        sim.close()
    return rows


COLUMNS = [("nodes", "nodes"), ("scenario", "scenario"), ("seconds", "s to all assigned"),
           ("requests_per_node", "requests/node"), ("keepalives_per_node", "keep-alives/node"),
           ("watch_msgs", "watch msgs"),
           ("watch_msgs_per_node", "watch msgs/node"), ("sent_kb_per_node", "KiB sent/node"),
           ("recv_kb_per_node", "KiB recv/node"), ("etcd_cpu_s", "etcd CPU s"),
           ("grants", "lease grants"), ("registrations", "registrations"), ("expired", "expired"),
           ("sim_cpu_max_pct", "sim CPU max %"), ("sim_cpu_total_pct", "sim CPU total %"),
           ("keepalives_per_s", "keep-alives/s sent"), ("etcd_keepalives_per_s", "keep-alives/s etcd got"),
           ("refresh_late_max_s", "refresh late max s"), ("refresh_slow_max_s", "keep-alive answer max s"),
           ("etcd_slow_applies", "etcd applies > 100 ms"), ("load", "load")]


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.rdzv_sim", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--procs", type=int, default=8)
    parser.add_argument("--cluster", action="store_true", help="a 3-member etcd cluster instead of one member")
    parser.add_argument("--timeout", type=float, default=300.0, help="longest wait for one scenario")
    parser.add_argument("--ramp", type=float, default=2.0,
                        help="seconds over which the nodes start (a cluster's agents start within seconds)")
    args = parser.parse_args(argv)
    if min(args.nodes) < 4 or args.procs < 1:
        parser.error(f"--nodes ({args.nodes}) must each be >= 4 and --procs ({args.procs}) >= 1")
    print(f"# etcd: {'3 members' if args.cluster else '1 member'}; {args.procs} processes; "
          f"lease ttl {Settings.lease_ttl}s, presence ttl {Settings.presence_ttl}s; load {os.getloadavg()[0]:.2f}",
          flush=True)
    rows: list[dict] = []
    ok = True
    for nodes in args.nodes:
        if args.cluster:
            from tests.etcd_cluster import EtcdCluster  # noqa: PLC0415 - test helper

            with EtcdCluster(3) as cluster:
                rows += run_size([m.client_url for m in cluster.members], cluster.endpoints, nodes,
                                 args.procs, args.timeout, args.ramp)
        else:
            with EtcdServer() as server:
                rows += run_size([server.url], server.endpoint, nodes, args.procs, args.timeout, args.ramp)
    for row in rows:
        ok &= row["grants"] == row["registrations"] and row["expired"] == 0 and row["round"] > 0
    print(table(rows))
    print(f"# load after: {os.getloadavg()[0]:.2f}; every scenario formed and no lease expired: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
