"""A local etcd (rendezvous.etcd.server, as the tests, the demo and ``--standalone`` start it)
whose chosen port is taken before etcd binds it: another socket may take a free port in the
moment between its choice and etcd's bind (CI saw a session's etcd die of it, and 101 tests
with it). The server chooses its ports anew and starts."""

from __future__ import annotations

import socket

from rendezvous.etcd.server import EtcdServer


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
