"""``make demo``: a local etcd and one rendezvous of 3 simulated nodes, printing the assignment.

    .venv/bin/python docs/examples/rendezvous_demo.py

Three participants (threads here; separate machines in real life) join job ``demo`` with
min 2 and max 3 nodes; the round closes as soon as the third joins, and each prints what it
was given. Then one leaves, and the other two show the next round without it.
"""

from __future__ import annotations

import sys
import threading

from rendezvous.etcd_server import EtcdServer
from rendezvous.etcd_store import EtcdStore
from rendezvous.participant import Participant
from rendezvous.settings import Settings
from rendezvous.state import Assignment, NodeRecord


def main() -> int:
    with EtcdServer() as server:
        print(f"etcd on {server.endpoint}")
        store = EtcdStore(server.endpoint)
        settings = Settings(job_id="demo", min_nodes=2, max_nodes=3, last_call=0.5, lease_ttl=5)
        nodes = [Participant(store, settings, NodeRecord(f"node-{c}", f"10.0.0.{i + 1}", 8))
                 for i, c in enumerate("abc")]
        got: dict[str, Assignment] = {}

        def join(p: Participant) -> None:
            p.start()
            got[p.node_id] = p.next_assignment(timeout=30)

        def show(title: str) -> None:
            print(title)
            for node_id, a in sorted(got.items()):
                print(f"  {node_id}: round {a.round}, group rank {a.group_rank(node_id)} of "
                      f"{len(a.members)}, ranks {a.rank_offset(node_id)}..{a.rank_offset(node_id) + 7}, "
                      f"master {a.master_addr}:{a.master_port}")

        threads = [threading.Thread(target=join, args=(p,)) for p in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        show("round closed with every node:")
        leaving = nodes[0]
        print(f"{leaving.node_id} leaves (revokes its lease, opens the next round)")
        leaving.leave(reason="demo")
        got.clear()
        threads = [threading.Thread(target=lambda p=p: got.__setitem__(p.node_id, p.next_assignment(timeout=30)))
                   for p in nodes[1:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        show("next round, survivors keep their relative order:")
        for p in nodes[1:]:
            p.leave()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
