"""Telling a process group's connections from a rank's others (pure): a connection belongs to
the group when its far end is a member's socket, and the endpoints a peer reports are checked."""

from __future__ import annotations

import json

from agent.worker import groups
from agent.worker.held import _message


def test_only_connections_to_a_members_socket_are_the_groups():
    members = {("10.0.0.1", 29500), ("10.0.0.1", 41000), ("10.0.0.2", 52000), ("127.0.0.1", 29500),
               ("127.0.0.1", 40001)}
    sockets = {
        3: (("10.0.0.1", 41000), ("10.0.0.2", 52000)),   # a gloo pair to the other node
        4: (("127.0.0.1", 40001), ("127.0.0.1", 29500)),  # the store client to rank 0 on this host
        5: (("10.0.0.1", 43000), ("10.0.0.9", 9091)),     # a metrics push
        6: (("127.0.0.1", 40002), ("127.0.0.1", 8000)),   # a data loader's local server
    }
    assert groups.group_sockets(sockets, members) == {3, 4}
    assert groups.group_sockets(sockets, set()) == set()  # nothing exchanged: nothing cut


def test_an_ipv4_peer_of_a_dual_stack_socket_matches_the_peers_own_view():
    assert groups._endpoint(("::ffff:10.0.0.2", 52000, 0, 0)) == ("10.0.0.2", 52000)
    assert groups._endpoint(("fe80::1", 80, 0, 0)) == ("fe80::1", 80)


def test_a_peers_endpoints_are_checked_not_trusted():
    raw = json.dumps({"completed": 3, "round": 1, "endpoints": [["10.0.0.2", 52000], ["x"], [1, 2], ["h", "80"],
                                                                 ["h", True], "junk"]})
    assert _message(raw.encode())["endpoints"] == [("10.0.0.2", 52000)]
    assert _message(json.dumps({"endpoints": "junk"}).encode())["endpoints"] == []
