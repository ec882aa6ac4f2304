"""Scale benchmark: N participants through one full round against a local etcd.

    python -m tests.bench.rdzv_scale --nodes 256

Starts its own etcd on 127.0.0.1, runs N participants in this process (one thread each,
sharing one gRPC channel, as N agents would share one etcd), and prints one JSON line:
nodes, round_seconds (first join until every participant holds the assignment),
etcd_requests_per_node (every request counted at the client, watch creations, cancels and
lease keep-alives included, divided by N), the count by request type, and assignment_ok.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time

from rendezvous.errors import RendezvousError
from rendezvous.etcd.server import EtcdServer
from rendezvous.etcd.store import EtcdStore
from rendezvous.participant import Participant
from rendezvous.settings import Settings
from rendezvous.state import Assignment, NodeRecord

PROG = "tests.bench.rdzv_scale"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nodes ({text!r}) must be a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--nodes ({value}) must be a positive integer")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        print(f"{PROG}: {message}", file=sys.stderr)
        sys.exit(2)


def run(nodes: int, last_call: float, lease_ttl: float, timeout: float) -> dict[str, object]:
    with EtcdServer() as server:
        store = EtcdStore(server.endpoint, retry_for=10.0)
        settings = Settings(job_id="bench", min_nodes=nodes, max_nodes=nodes,
                            last_call=last_call, lease_ttl=lease_ttl)
        participants = [
            Participant(store, settings, NodeRecord(f"node-{i:05d}", "127.0.0.1", 8),
                        port_reserver=lambda: 29500)
            for i in range(nodes)
        ]
        results: dict[int, Assignment] = {}
        errors: list[str] = []
        started = threading.Barrier(nodes + 1)

        def one(i: int) -> None:
            started.wait()
            try:
                participants[i].start()
                results[i] = participants[i].next_assignment(timeout=timeout)
            except RendezvousError as exc:
                errors.append(f"node-{i:05d}: {exc}")

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(nodes)]
        for t in threads:
            t.start()
        started.wait()
        t0 = time.monotonic()
        for t in threads:
            t.join(timeout + 30)
        elapsed = time.monotonic() - t0
        counts = store.requests.snapshot()
        for p in participants:
            p.close()
        store.close()
    first = next(iter(results.values()), None)
    ok = (
        not errors and len(results) == nodes and first is not None
        and all(a == first for a in results.values())
        and sorted(first.group_rank(f"node-{i:05d}") for i in range(nodes)) == list(range(nodes))
    )
    return {
        "nodes": nodes,
        "round_seconds": round(elapsed, 3),
        "etcd_requests_per_node": round(sum(counts.values()) / nodes, 2),
        "requests_by_type": counts,
        "assignment_ok": ok,
        **({"errors": errors[:3]} if errors else {}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=positive_int, required=True)
    parser.add_argument("--last-call", type=float, default=Settings.last_call)
    parser.add_argument("--lease-ttl", type=float, default=Settings.lease_ttl)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run(args.nodes, args.last_call, args.lease_ttl, args.timeout)
    print(json.dumps(result, sort_keys=False))
    return 0 if result["assignment_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
