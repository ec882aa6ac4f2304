"""A local etcd (rendezvous.etcd.server, as the tests, the demo and ``--standalone`` start it)
whose chosen port is taken before etcd binds it: another socket may take a free port in the
moment between its choice and etcd's bind (CI saw a session's etcd die of it, and 101 tests
with it). The server chooses its ports anew and starts; so does the tests' 3-member cluster."""

from __future__ import annotations

import socket

from rendezvous.etcd.server import EtcdServer
from tests.etcd_cluster import EtcdCluster


def test_a_client_port_taken_before_etcd_binds_it_is_chosen_anew() -> None:
    server = EtcdServer()
    taken = server.client_port
    with socket.create_server(("127.0.0.1", taken)) as thief:
        try:
            server.start()
            assert server.client_port != taken
            assert server.proc is not None and server.proc.poll() is None
            assert thief.getsockname()[1] == taken  # the thief still has it: etcd listens elsewhere
        finally:
            server.stop()


def test_a_cluster_member_whose_port_was_taken_starts_with_the_others_on_new_ports() -> None:
    cluster = EtcdCluster()
    taken = cluster.members[1].peer_port
    with socket.create_server(("127.0.0.1", taken)):
        with cluster:
            assert cluster.leader() is not None
            assert all(m.running for m in cluster.members)
            assert taken not in {p for m in cluster.members for p in (m.client_port, m.peer_port)}
