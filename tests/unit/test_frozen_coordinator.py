"""A coordinator frozen during a round (SIGSTOP, a stuck kernel) is replaced once its presence
(--presence-ttl) lapses, not when its membership lease (--lease-ttl) does: the followers watch
its presence too. Participants against a MemoryStore, stepped on one thread (the Cluster of
test_rdzv_participant)."""

from __future__ import annotations

from tests.unit.test_rdzv_participant import Cluster


def test_followers_replace_a_coordinator_whose_presence_lapsed():
    c = Cluster(min_nodes=3, max_nodes=3)
    frozen, follower = c.add("n00"), c.add("n01")
    c.settle()  # n00 coordinates round 1, n01 follows it; both wait for a third node
    assert not frozen.assignments and not follower.assignments
    # n00 freezes: it is never stepped again and its presence lapses; its membership lease
    # (and so its join key) would last much longer.
    del c.nodes["n00"]
    c.store.delete(c.settings.presence_key("n00"))
    late = [c.add("n02"), c.add("n03")]
    c.settle()
    for node in (follower, *late):
        assert node.assignments, f"{node.p.node_id} still waits behind the frozen coordinator: {c.describe()}"
        assert set(node.assignments[-1].node_ids) == {"n01", "n02", "n03"}


def test_a_joiner_whose_presence_lapsed_is_passed_over_at_the_election():
    c = Cluster(min_nodes=2, max_nodes=3)
    c.add("n00")
    c.settle()  # n00 alone coordinates, waiting for a second node
    del c.nodes["n00"]
    c.store.delete(c.settings.presence_key("n00"))
    late = [c.add("n01"), c.add("n02")]
    c.settle()
    for node in late:
        assert node.assignments, f"{node.p.node_id} follows a silent joiner: {c.describe()}"
        assert set(node.assignments[-1].node_ids) == {"n01", "n02"}
