"""Peer liveness over the data network: a tiny UDP echo server per agent, bound to the address
its workers use (``--node-addr``), and a prober that asks a few peers (its ring neighbours,
rendezvous.protocol.reachability.ring_peers) every ``INTERVAL`` seconds.

A probe is 21 bytes: ``EAP1``, ``Q`` (question) or ``A`` (answer), an 8-byte tag of the job id
and an 8-byte sequence number. The server answers a well-formed question of its own job with
the same bytes but ``A``, one datagram for one (no amplification), and drops anything else
unread: nothing in a probe is trusted or kept. A peer is *unreachable* once ``MISSES``
probes in a row went unanswered over at least ``SILENCE`` seconds: one lost datagram, or a
burst on a lossy link shorter than that, reports nobody.

Wired into the agent by agent.daemon.connection.reach_watch (docs/architecture.md, "The network between
nodes").
"""

from __future__ import annotations

import hashlib
import logging
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("elastic_agent")

MAGIC = b"EAP1"
_FORMAT = struct.Struct("!4sc8sQ")  # magic, kind, job tag, sequence
SIZE = _FORMAT.size
INTERVAL = 0.1  # seconds between probes of one peer
MISSES = 8  # unanswered probes in a row, and ...
SILENCE = 0.8  # ... seconds since the last answer, before a peer counts as unreachable


def job_tag(job_id: str) -> bytes:
    return hashlib.sha256(job_id.encode()).digest()[:8]


def encode(kind: bytes, tag: bytes, seq: int) -> bytes:
    return _FORMAT.pack(MAGIC, kind, tag, seq)


def decode(data: bytes, tag: bytes) -> tuple[bytes, int] | None:
    """(kind, seq) of a well-formed probe of this job, else None."""
    if len(data) != SIZE:
        return None
    magic, kind, their_tag, seq = _FORMAT.unpack(data)
    if magic != MAGIC or kind not in (b"Q", b"A") or their_tag != tag:
        return None
    return kind, seq


@dataclass
class _Peer:
    sent: int = 0  # probes sent since the last answer
    heard: float | None = None  # monotonic time of the last answer (or of the first probe)
    answered_at: float | None = None  # monotonic time of the last answer (None: none yet)


class Misses:
    """Pure: who has not answered, from what was sent and heard when (``now`` passed in)."""

    def __init__(self, misses: int = MISSES, silence: float = SILENCE) -> None:
        self.misses, self.silence = misses, silence
        self._peers: dict[str, _Peer] = {}
        self._totals: dict[str, tuple[int, int]] = {}  # probes sent, answers heard, while tracked

    def track(self, peers: tuple[str, ...], now: float) -> None:
        """Probe these peers from now on (a new round's neighbours); forget the others."""
        self._peers = {p: self._peers.get(p) or _Peer(heard=now) for p in peers}
        self._totals = {p: self._totals.get(p, (0, 0)) for p in peers}

    def sent(self, peer: str) -> None:
        if peer in self._peers:
            self._peers[peer].sent += 1
            sent, heard = self._totals[peer]
            self._totals[peer] = (sent + 1, heard)

    def answered(self, peer: str, now: float) -> float:
        """Record an answer; returns how long the peer had been silent (0 if not tracked)."""
        if peer not in self._peers:
            return 0.0
        before = self._peers[peer].heard
        self._peers[peer] = _Peer(heard=now, answered_at=now)
        sent, heard = self._totals[peer]
        self._totals[peer] = (sent, heard + 1)
        return now - before if before is not None else 0.0

    def totals(self) -> dict[str, tuple[int, int]]:
        """Per tracked peer: (probes sent, answers heard) so far; differences give a loss rate."""
        return dict(self._totals)

    def answered_all(self, since: float) -> bool:
        """Every tracked peer answered at or after ``since``."""
        return all(s.answered_at is not None and s.answered_at >= since for s in self._peers.values())

    def unreachable(self, now: float) -> frozenset[str]:
        return frozenset(p for p, s in self._peers.items()
                         if s.sent >= self.misses and s.heard is not None and now - s.heard >= self.silence)


def steady(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], ratio: float) -> bool:
    """Pure: between two ``Misses.totals()``, every peer answered at least ``ratio`` of the
    probes sent to it (and some were sent): the bar for a node that failed before to come back,
    so a lossy link that answers now and then does not flap in and out of the job."""
    for peer, (sent, heard) in after.items():
        sent0, heard0 = before.get(peer, (0, 0))
        if sent - sent0 <= 0 or (heard - heard0) < ratio * (sent - sent0):
            return False
    return True


class ProbeServer:
    """Answers probes on (``addr``, ``port``); port 0 picks one (see ``port``)."""

    def __init__(self, addr: str, port: int, job_id: str, *, cut: Callable[[], bool] = lambda: False) -> None:
        """``cut``: while true, every probe is dropped unanswered (tests: a node cut off)."""
        self.tag, self.cut = job_tag(job_id), cut
        self.sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((addr, port))
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="probe-server")

    def start(self) -> ProbeServer:
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if not ready:
                continue
            try:
                data, sender = self.sock.recvfrom(64)
            except OSError:
                continue
            probe = decode(data, self.tag)
            if probe is not None and probe[0] == b"Q" and not self.cut():
                try:
                    self.sock.sendto(encode(b"A", self.tag, probe[1]), sender)
                except OSError:
                    pass  # the sender's route is gone: nothing to tell it

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


class Prober:
    """Probes ``peers`` (node id -> (addr, port)) every ``INTERVAL`` from a thread of its own;
    ``unreachable()`` is who has stopped answering. ``clock`` is the host's monotonic clock.
    ``on_change`` is called (from the prober's thread) when that set changes; ``source`` is the
    address probes leave from (the node's --node-addr: the workers' network, not etcd's)."""

    def __init__(self, job_id: str, clock: Callable[[], float], misses: Misses | None = None, *,
                 on_change: Callable[[], None] = lambda: None, source: str = "",
                 cut: Callable[[], bool] = lambda: False) -> None:
        self.tag, self.clock = job_tag(job_id), clock
        self.misses = misses or Misses()
        self.on_change, self.source, self.cut = on_change, source, cut  # cut: while true, hear no answer
        self._last: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._peers: dict[str, tuple[str, int]] = {}
        self._by_addr: dict[tuple[str, int], str] = {}
        self._seq = 0
        self._stop = threading.Event()
        self._socks: dict[int, socket.socket] = {}
        self._thread = threading.Thread(target=self._run, daemon=True, name="peer-prober")

    def start(self) -> Prober:
        self._thread.start()
        return self

    def set_peers(self, peers: dict[str, tuple[str, int]]) -> None:
        """Probe these from now on; the first probes leave at once (a check waits on them)."""
        with self._lock:
            if peers == self._peers:
                return
            self._peers = dict(peers)
            self._by_addr = {addr: node for node, addr in peers.items()}
            self.misses.track(tuple(sorted(peers)), self.clock())
            self._send_all()

    def unreachable(self) -> frozenset[str]:
        with self._lock:
            return self.misses.unreachable(self.clock())

    def answered_all(self, since: float) -> bool:
        with self._lock:
            return self.misses.answered_all(since)

    def totals(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            return self.misses.totals()

    def probe_now(self) -> None:
        """Probe every peer at once (a check waits on the answers), besides the steady pace."""
        with self._lock:
            self._send_all()

    def _sock(self, family: int) -> socket.socket:
        if family not in self._socks:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            if self.source and (":" in self.source) == (family == socket.AF_INET6):
                try:
                    sock.bind((self.source, 0))
                except OSError:
                    pass  # the address is not this host's (yet): the kernel picks the route
            self._socks[family] = sock
        return self._socks[family]

    def _send_all(self) -> None:  # under self._lock
        self._seq += 1
        for node, (addr, port) in self._peers.items():
            try:
                family = socket.AF_INET6 if ":" in addr else socket.AF_INET
                self._sock(family).sendto(encode(b"Q", self.tag, self._seq), (addr, port))
            except OSError:
                pass  # no route: counted as a miss like any unanswered probe
            self.misses.sent(node)

    def _run(self) -> None:
        next_round = self.clock()
        while not self._stop.is_set():
            now = self.clock()
            if now >= next_round:
                next_round = now + INTERVAL
                with self._lock:
                    self._send_all()
            with self._lock:  # set_peers may add one from another thread
                socks = list(self._socks.values())
            ready = select.select(socks, [], [], max(0.0, next_round - self.clock()))[0] if socks else []
            if not socks:
                self._stop.wait(INTERVAL)
            for sock in ready:
                self._receive(sock)
            now_unreachable = self.unreachable()
            if now_unreachable != self._last:
                self._last = now_unreachable
                self.on_change()

    def _receive(self, sock: socket.socket) -> None:
        try:
            data, sender = sock.recvfrom(64)
        except OSError:
            return
        probe = decode(data, self.tag)
        if self.cut():
            return
        with self._lock:
            node = self._by_addr.get((sender[0], sender[1]))
            if probe is not None and probe[0] == b"A" and node is not None and probe[1] >= self._seq - MISSES:
                silent = self.misses.answered(node, self.clock())
                if silent >= self.misses.silence / 2:  # a near miss: how close load came to a verdict
                    log.info("peer %s answered probes again after %.2fs of silence (unreachable at %.1fs)",
                             node, silent, self.misses.silence)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for sock in self._socks.values():
            sock.close()
