"""The judgement of `make chaos`'s network scenarios (tests/chaos/peers.py) and the loss rule of
its user-space lossy link (tests/chaos/lossy.py) can tell right from wrong: a node removed and
let back in again is a flap, the wrong node removed shows, and the link drops only the frames
to and from the peers named. Pure: no namespaces, no processes."""

from __future__ import annotations

import ipaddress
import random

from tests.chaos import lossy
from tests.chaos.evidence import Claim, Step, Timeline
from tests.chaos.peers import Closed, Trained, closed_rounds, moves, trained_rounds


def frame(src: str, dst: str, ethertype: bytes = lossy.ETH_IPV4) -> bytes:
    """An Ethernet frame carrying the start of an IPv4 header from ``src`` to ``dst``."""
    ip = bytes(12) + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
    return bytes(12) + ethertype + ip + bytes(20)


def test_the_loss_applies_only_to_frames_to_or_from_the_peers_named():
    loss = lossy.Loss()
    assert lossy.answer(loss, "loss 1 10.77.0.15") == "ok"
    assert loss.drop(frame("10.77.0.14", "10.77.0.15")) and loss.drop(frame("10.77.0.15", "10.77.0.14"))
    assert not loss.drop(frame("10.77.0.14", "10.77.0.11"))  # etcd's
    assert not loss.drop(frame("10.77.0.14", "10.77.0.15", ethertype=b"\x08\x06"))  # ARP
    assert lossy.answer(loss, "count") == "passed 0 dropped 2"


def test_the_loss_drops_about_the_fraction_asked_and_nothing_at_zero():
    random.seed(7)
    loss = lossy.Loss()
    lossy.answer(loss, "loss 0.3")
    dropped = sum(loss.drop(frame("10.0.0.1", "10.0.0.2")) for _ in range(10_000))
    assert 2700 < dropped < 3300
    lossy.answer(loss, "loss 0")
    assert not any(loss.drop(frame("10.0.0.1", "10.0.0.2")) for _ in range(1000))


def test_a_bad_control_line_is_one_line_naming_what_was_expected():
    loss = lossy.Loss()
    assert lossy.answer(loss, "loss 2") == "error: loss 2.0: expected a fraction from 0 to 1"
    assert lossy.answer(loss, "loss 0.5 not-an-address").startswith("error: ")
    assert "expected 'loss P [ADDR ...]' or 'count'" in lossy.answer(loss, "drop everything")
    assert loss.fraction == 0.0


def test_out_and_in_and_out_again_is_two_removals_and_one_readmission():
    assert moves([{"a", "c"}, {"a", "b", "c"}, {"a", "c"}], "b") == (2, 1)
    assert moves([{"a", "c"}, {"a", "c"}], "b") == (1, 0)
    assert moves([{"a", "b", "c"}], "b") == (0, 0)
    assert moves([{"a", "b"}], "b", was_in=False) == (0, 1)


def test_every_closed_round_counts_whether_or_not_it_trained():
    """A round moved on by its connectivity check never trains, yet its members restarted for
    it: a node let into it and thrown out again has flapped."""
    lines = [
        (1.0, "[elastic-agent n0] INFO round 1 closed (last call: no new node for 0.5s; membership change "
              "(start)): n0, n1, n2"),
        (2.0, "[elastic-agent n2] INFO round 2 closed (every live node (2) joined; membership change "
              "(unreachable: n1 (its ring neighbours cannot reach it))): n0, n2"),
        (3.0, "[elastic-agent n1] INFO round 3 closed (every live node (3) joined; membership change "
              "(scale_up: n1 is waiting)): n0, n2, n1"),
        (3.5, "[n0/0] step 7 world_size 2 loss 0.1"),
        (4.0, "[elastic-agent n0] INFO round 4 closed (x (y)): n0, n2"),
    ]
    got = closed_rounds(lines, since=1.5)
    assert got == [Closed(2, 2.0, frozenset({"n0", "n2"})), Closed(3, 3.0, frozenset({"n0", "n1", "n2"})),
                   Closed(4, 4.0, frozenset({"n0", "n2"}))]
    assert moves((r.nodes for r in got), "n1") == (2, 1)


def test_a_trained_round_is_one_whose_first_step_came_after_and_its_members_are_who_claimed_it():
    claims = [Claim(1.0, n, 1, i, 3) for i, n in enumerate("abc")] + [Claim(5.0, n, 2, i, 2) for i, n in enumerate("ac")]
    steps = [Step(2.0, 1, 3, 1, "a"), Step(6.0, 2, 2, 2, "a"), Step(6.1, 3, 2, 2, "a")]
    got = trained_rounds(Timeline(claims, steps, []), since=3.0)
    assert got == [Trained(2, 6.0, frozenset("ac"), 2)]
