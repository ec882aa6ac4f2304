"""Who is cut off, from the peers' reports (rendezvous.reachability): the node nobody reaches
is removed, never the nodes it cannot reach, never on one reporter's word, never with two
nodes, never a majority."""

from __future__ import annotations

import pytest

from rendezvous.reachability import cut_off, ring_peers

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
