"""Peer probes over real UDP sockets on 127.0.0.1 (agent.daemon.connection.peer_probe): a peer whose probe
server stops answering is reported unreachable within about a second, a peer that answers
never is, and the server answers only well-formed probes of its own job."""

from __future__ import annotations

import socket
import time

from agent.daemon.connection.peer_probe import SIZE, Misses, Prober, ProbeServer, encode, job_tag, steady
from tests.waiting import wait_until


def test_a_single_miss_reports_nobody_a_silence_does():
    misses = Misses(misses=3, silence=0.5)
    misses.track(("b",), now=0.0)
    misses.sent("b")
    assert misses.unreachable(1.0) == frozenset()  # one probe unanswered
    for _ in range(3):
        misses.sent("b")
    assert misses.unreachable(0.4) == frozenset()  # not yet silent long enough
    assert misses.unreachable(0.6) == {"b"}
    misses.answered("b", 0.7)
    assert misses.unreachable(0.8) == frozenset()


def test_a_check_counts_only_answers_that_came_after_it_began():
    misses = Misses()
    misses.track(("b", "c"), now=0.0)
    misses.answered("b", 1.0)
    misses.answered("c", 1.0)
    assert misses.answered_all(since=1.0)
    # A later check (a node left out that rejoins, a new round with the same neighbours)
    # must hear them again: an answer from before proves nothing about the link now.
    assert not misses.answered_all(since=2.0)
    misses.answered("b", 2.1)
    assert not misses.answered_all(since=2.0)
    misses.answered("c", 2.2)
    assert misses.answered_all(since=2.0)


def test_a_node_that_failed_comes_back_only_over_a_steady_link():
    before = {"b": (10, 10), "c": (10, 4)}
    assert steady(before, {"b": (40, 40), "c": (40, 32)}, 0.9)  # 30 of 30, 28 of 30
    # A lossy link (netem): it answers now and then, which is not enough to come back.
    assert not steady(before, {"b": (40, 40), "c": (40, 20)}, 0.9)
    assert not steady(before, {"b": (10, 10), "c": (40, 34)}, 0.9)  # nothing sent to b: no verdict


def test_a_peer_that_stops_answering_is_reported_and_only_it():
    servers = {n: ProbeServer("127.0.0.1", 0, "job").start() for n in ("b", "c")}
    prober = Prober("job", time.monotonic).start()
    try:
        prober.set_peers({n: ("127.0.0.1", s.port) for n, s in servers.items()})
        time.sleep(1.0)  # the condition checked is that nothing happens: let probes run a while
        assert prober.unreachable() == frozenset()
        servers.pop("c").close()
        stopped = time.monotonic()
        wait_until(lambda: prober.unreachable() == {"c"}, 5.0, "c reported unreachable")
        assert time.monotonic() - stopped < 2.0
    finally:
        prober.close()
        for server in servers.values():
            server.close()


def test_the_server_answers_only_well_formed_probes_of_its_job():
    server = ProbeServer("127.0.0.1", 0, "job").start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(0.5)
    try:
        for junk in (b"", b"x" * SIZE, b"x" * 1000, encode(b"Q", job_tag("other-job"), 1), encode(b"A", job_tag("job"), 1)):
            client.sendto(junk, ("127.0.0.1", server.port))
        client.sendto(encode(b"Q", job_tag("job"), 7), ("127.0.0.1", server.port))
        data, _ = client.recvfrom(64)
        assert data == encode(b"A", job_tag("job"), 7)  # the first answer is to the one good probe
        try:
            extra = client.recvfrom(64)
        except socket.timeout:
            extra = None
        assert extra is None
    finally:
        client.close()
        server.close()
