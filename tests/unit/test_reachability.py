"""Who is cut off, from the peers' reports (rendezvous.protocol.reachability): the node nobody reaches
is removed, never the nodes it cannot reach, never on one reporter's word, never with two
nodes, never a majority."""

from __future__ import annotations

import pytest

from rendezvous.protocol.reachability import Report, cut_off, decide, prospective_peers, ring_peers

FIVE = ("a", "b", "c", "d", "e")


def test_ring_peers_are_the_neighbours():
    assert ring_peers(FIVE, "a") == ("b", "e")
    assert ring_peers(FIVE, "c") == ("b", "d")
    assert ring_peers(("a", "b"), "a") == ("b",)
    assert ring_peers(("a",), "a") == () and ring_peers(FIVE, "z") == ()


@pytest.mark.parametrize("reports, expected", [
    # c is partitioned from its peers: both neighbours report it, it reports both of them.
    ({"b": {"c"}, "d": {"c"}, "c": {"b", "d"}}, {"c"}),
    ({"b": {"c"}}, set()),  # one reporter, or one missed probe's worth: nobody
    ({"b": {"c"}, "c": {"b"}}, set()),  # a broken link between two nodes: cannot tell the side
    ({"b": {"c"}, "d": {"c"}, "e": {"z"}}, {"c"}),  # a peer outside the round is ignored
    # Everybody reports everybody (the reporters' own network is down): no majority removed.
    ({n: set(FIVE) - {n} for n in FIVE}, set()),
])
def test_cut_off(reports, expected):
    assert cut_off(reports, FIVE) == frozenset(expected)


def test_two_nodes_never_remove_each_other():
    assert cut_off({"a": {"b"}, "b": {"a"}}, ("a", "b")) == frozenset()


def report(number: int, *peers: str) -> bytes:
    return Report(number, peers).encode()


def test_decide_reads_the_records_of_this_round_only():
    members = ("a", "b", "c")
    assert decide({"a": report(5, "c"), "b": report(5, "c")}, members, 5) == {"c"}
    # Reports left from an earlier round (its ring was another one) count for nothing.
    assert decide({"a": report(4, "c"), "b": report(5, "c")}, members, 5) == frozenset()
    # Garbage from etcd counts for nothing either, and raises nothing.
    for junk in (b"", b"[1]", b'{"v": 1, "round": 5, "unreachable": ["c d"]}',
                 b'{"v": 1, "round": 5, "unreachable": "c"}', b'{"v": 2, "round": 5, "unreachable": ["c"]}',
                 b'{"v": 1, "round": true, "unreachable": ["c"]}', b"[" * 100000):
        assert decide({"a": report(5, "c"), "b": junk}, members, 5) == frozenset(), junk[:40]


def test_a_report_is_small_and_reads_back():
    r = Report(7, ("node-2", "node-1"), kept_out=True)
    assert Report.decode(r.encode()) == Report(7, ("node-1", "node-2"), kept_out=True)
    assert len(Report(7, ("node-1", "node-2")).encode()) < 64
    assert Report.decode(Report(1, tuple(f"n{i}" for i in range(65))).encode()) is None


def test_a_node_outside_the_round_would_sit_between_the_last_member_and_the_first():
    assert prospective_peers(("a", "b", "c"), "z") == ("a", "c")
    assert prospective_peers(("a",), "z") == ("a",)
    assert prospective_peers((), "z") == ()
    assert prospective_peers(("a", "z", "b"), "z") == ("a", "b")  # a left-out member: its slot is gone
