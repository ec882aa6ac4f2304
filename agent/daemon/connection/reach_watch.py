"""The network between nodes, as the agent acts on it: probe the ring neighbours over the
workers' network (agent.daemon.connection.peer_probe), publish what it cannot reach, and cut off the node
its neighbours cannot reach (rendezvous.protocol.reachability).

Three hooks, each thin:

- ``tick`` (the running loop, woken by the prober when its verdict changes): publish this
  node's report ``reach/<node-id>`` when the set of peers it cannot reach changes (O(1) bytes,
  no write per probe), then read the prefix; when the reports name a node (both its ring
  neighbours, trusted: rendezvous.protocol.reachability.cut_off), open the next round without it,
  reason ``unreachable``. The last of its reporters to write is the one that sees both reports.
- ``check`` (after a round closed, before its workers start or re-form): every ring
  neighbour must answer a probe; a neighbour that does not within the probe verdict's bound
  is reported at once, as above. Bounded by ``CHECK_LIMIT``; a slow answer alone never
  holds a round back past it.
- ``admit`` (the rendezvous, before this node joins a round it is not a member of: a
  newcomer, a standby, a node left out): the members it would neighbour must answer its
  probes first (a node that failed before: steadily, for ``READMIT_WINDOW``, so a lossy link
  does not flap in and out). Until then it stays out, and says so once: a log line, the metric
  ``elastic_agent_connectivity_check_failures_total``, and its report marked ``kept_out``
  (``elastic-agent status`` shows it).

Errors talking to etcd are logged, never raised: a lost report is retried on the next tick.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge

from agent.daemon.config.layers import AgentConfig
from agent.daemon.connection.peer_probe import Prober, ProbeServer, steady
from agent.observe.metrics import AgentMetrics
from rendezvous.clock import Clock
from rendezvous.errors import CorruptStateError, RendezvousError
from rendezvous.protocol import reachability
from rendezvous.protocol.rounds import open_next_round
from rendezvous.reasons import Reason, reason_text
from rendezvous.settings import Settings
from rendezvous.state import Assignment, NodeRecord, RoundState
from rendezvous.store import Store

log = logging.getLogger("elastic_agent")

# Tests only: a path; while a file is there, this node neither answers probes nor hears answers
# (its link to the peers is cut; etcd still answers).
CUT_ENV = "ELASTIC_AGENT_TEST_CUT_FILE"
CHECK_LIMIT = 2.0  # seconds a round's check waits, at most, for its neighbours' answers
POLL = 0.01  # seconds between looks while a check waits
ADMIT_POLL = 0.05
RESOLVE_EVERY = 1.0  # seconds between reads of the would-be neighbours' presence, while waiting
READMIT_WINDOW = 3.0  # seconds a node that failed must hear its would-be neighbours ...
READMIT_RATIO = 0.9  # ... answer at least this share of its probes, before it joins again
LOSS_WINDOW = 10.0  # seconds over which a neighbour's share of unanswered probes is measured
LOSS_WARN = 0.2  # a share at or above this is a lossy link: said, and shown as a metric
LOSS_MIN_PROBES = 50  # ... over at least this many probes (5 s of them at 10 a second)


class LinkLoss:
    """A lossy link is noticed: the verdict needs ``MISSES`` unanswered probes in a row, which a
    link losing 30 % of its frames almost never gives (0.3^8), while it slows a collective 20x.
    Every ``LOSS_WINDOW`` the share of each neighbour's probes left unanswered is measured
    from the prober's totals; the worst goes to a gauge, and one at or above ``LOSS_WARN``
    is logged, naming the peer. It removes nobody: a lossy link is not a cut one. But a node
    whose link was lossy when it left the job (its neighbours removed it once their probes went
    unanswered 8 times in a row) is ``lossy`` and rejoins only over a steady link: at 80 %
    loss an occasional answer kept its own verdict clear, and it was let in again at once."""

    def __init__(self, totals: Callable[[], dict[str, tuple[int, int]]], gauge: Any, now: Callable[[], float]) -> None:
        self._totals, self._gauge, self._now = totals, gauge, now
        self._start: tuple[float, dict[str, tuple[int, int]]] = (now(), totals())
        self.lossy = False  # the last whole window had a neighbour at LOSS_WARN or more

    def tick(self) -> None:
        now = self._now()
        began, before = self._start
        if now - began < LOSS_WINDOW:
            return
        totals = self._totals()
        self._start = (now, totals)
        worst = 0.0
        for peer, (sent, heard) in sorted(totals.items()):
            sent0, heard0 = before.get(peer, (0, 0))
            asked, answered = sent - sent0, heard - heard0
            if asked < LOSS_MIN_PROBES:
                continue
            lost = max(0.0, 1 - answered / asked)
            worst = max(worst, lost)
            if lost >= LOSS_WARN:
                log.warning("the link to %s is lossy: %d of %d probes over --node-addr got no answer from it in "
                            "the last %.0f s (%.0f %%); collectives with it will be slow", peer, asked - answered,
                            asked, now - began, lost * 100)
        self._gauge.set(worst)
        self.lossy = worst >= LOSS_WARN


def _resolve(addr: str) -> str | None:
    """An address to send datagrams to (a host name resolved once per round, not per probe)."""
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(addr, None, type=socket.SOCK_DGRAM)[0][4][0]
    except (OSError, IndexError):
        return None


def _metrics(metrics: AgentMetrics) -> tuple[Any, Any, Any]:
    """The node's network gauges and counter (docs/metrics.md)."""
    labels, r = ("job_id", "node"), metrics.registry
    unreachable = Gauge("elastic_agent_unreachable_peers", "Ring neighbours this node cannot reach over "
                        "--node-addr (probes unanswered).", labels, registry=r).labels(*metrics.labels)
    failures = Counter("elastic_agent_connectivity_check_failures", "Times this node was kept out of the job "
                       "because a peer it would train with did not answer its probes.",
                       labels, registry=r).labels(*metrics.labels)
    loss = Gauge("elastic_agent_peer_probe_loss_ratio", "Share of probes to the worst ring neighbour left "
                 "unanswered over the last 10 s (a lossy link).", labels, registry=r).labels(*metrics.labels)
    return unreachable, failures, loss


def _probe_targets(store: Store, settings: Settings, peers: tuple[str, ...]) -> dict[str, tuple[str, int]] | None:
    """Where to probe ``peers`` (node ids): address and probe port from their node records. A
    peer that is not present (dead: nobody to hear from), or has no record or probe port, is
    left out; None when etcd could not be read (tried again later)."""
    found: dict[str, tuple[str, int]] = {}
    for peer in peers:
        try:
            present, _ = store.get(settings.presence_key(peer))
            kv, _ = store.get(settings.node_key(peer)) if present is not None else (None, 0)
            record = NodeRecord.decode(kv.key, kv.value) if kv is not None else None
        except CorruptStateError as exc:  # not probed: judged by its lease alone
            log.warning("cannot probe %s: %s", peer, exc)
            continue
        except RendezvousError as exc:
            log.warning("cannot read %s's node record to probe it (%s); retrying", peer, exc)
            return None
        addr = _resolve(record.addr) if record is not None and record.probe_port else None
        if addr is not None and record is not None:
            found[peer] = (addr, record.probe_port)
    return found


class PeerWatch:
    def __init__(self, config: AgentConfig, store: Store, settings: Settings, metrics: AgentMetrics, clock: Clock,
                 environ: Mapping[str, str], participant: Callable[[], object]) -> None:
        """``participant``: the rendezvous participant, once made (its lease, its wake)."""
        self.store, self.settings, self.clock = store, settings, clock
        self.me, self._participant = config.node_id, participant
        cut_file = environ.get(CUT_ENV, "")
        cut = (lambda: os.path.exists(cut_file)) if cut_file else (lambda: False)
        try:
            self.server: ProbeServer | None = ProbeServer(config.node_addr, 0, config.job_id, cut=cut).start()
        except OSError as exc:  # peers then never probe this node: it is judged by its lease alone
            log.warning("no probe server on --node-addr %s (%s); peers cannot check this node's network",
                        config.node_addr, exc)
            self.server = None
        self.prober = Prober(config.job_id, clock.monotonic, on_change=self._wake, source=config.node_addr,
                             cut=cut).start()
        self.gauge, self.failures, loss_gauge = _metrics(metrics)
        self.loss = LinkLoss(self.prober.totals, loss_gauge, clock.monotonic)
        self.published = reachability.Report(0, ())  # what reach/<me> holds ("round 0": nothing)
        self.kept_out = False
        self._peers_of: tuple[int, tuple[str, ...]] | None = None
        self._since = 0.0  # when the peers probed now were chosen
        self._window: tuple[float, dict[str, tuple[int, int]]] | None = None  # readmission: start, totals
        self._resolved_at = 0.0  # when the probed peers' records were last read
        self._lost_since: float | None = None  # since when a would-be neighbour has been silent

    @classmethod
    def of(cls, agent: Any, environ: Mapping[str, str]) -> PeerWatch:
        """For an agent.daemon.loop.Agent under construction (its participant comes after)."""
        return cls(agent.config, agent.store, agent.settings, agent.metrics, agent.clock, environ,
                   lambda: getattr(agent, "participant", None))

    @property
    def port(self) -> int:
        return self.server.port if self.server is not None else 0

    def _wake(self) -> None:
        wake = getattr(self._participant(), "wake", None)
        if wake is not None:
            wake()

    # --- whom to probe ---------------------------------------------------------------------
    def _probe(self, number: int, peers: tuple[str, ...], refresh: bool = False) -> None:
        """Probe ``peers`` (node ids): their addresses and probe ports read from their node
        records once per round (``refresh``: again every ``RESOLVE_EVERY``). A peer that is not
        present (dead: nobody to hear from), or has no record or probe port, is not probed."""
        now = self.clock.monotonic()
        if self._peers_of == (number, peers) and not (refresh and now - self._resolved_at >= RESOLVE_EVERY):
            return
        if self._peers_of != (number, peers):
            self._since = now
        self._resolved_at = now
        found = _probe_targets(self.store, self.settings, peers)
        if found is None:
            return  # tried again on the next call
        fresh = self._peers_of != (number, peers)
        self._peers_of = (number, peers)
        self.prober.set_peers(found)
        if fresh:
            self.prober.probe_now()  # the same peers as before still owe an answer from now on

    # --- running ---------------------------------------------------------------------------
    def tick(self, assignment: Assignment | None) -> None:
        """While running in ``assignment``: report a change, and act on the reports."""
        if assignment is None:
            return
        self._probe(assignment.round, reachability.ring_peers(assignment.node_ids, self.me))
        lost = self.prober.unreachable()
        self.gauge.set(len(lost))
        self.loss.tick()
        if self.published == reachability.Report(assignment.round, tuple(sorted(lost))):
            return
        if self._publish(reachability.Report(assignment.round, tuple(sorted(lost)))) and lost:
            self._decide(assignment)

    def check(self, assignment: Assignment, tick: Callable[[], None]) -> bool:
        """Before the workers of ``assignment`` start: True to go on, False when the round
        was moved on because a member is cut off (the caller joins the next one)."""
        self._probe(assignment.round, reachability.ring_peers(assignment.node_ids, self.me))
        since = self._since
        deadline = self.clock.monotonic() + CHECK_LIMIT
        while not self.prober.answered_all(since) and not self.prober.unreachable():
            if self.clock.monotonic() >= deadline:
                log.warning("round %d: a ring neighbour neither answered nor went silent within %.1fs; "
                            "going on", assignment.round, CHECK_LIMIT)
                return True
            tick()
            self.clock.sleep(POLL)
        lost = self.prober.unreachable()
        self.gauge.set(len(lost))
        self.loss.tick()
        report = reachability.Report(assignment.round, tuple(sorted(lost)))
        if self.published != report and self._publish(report) and lost:
            log.warning("round %d: ring neighbour(s) %s do not answer probes on their --node-addr",
                        assignment.round, ", ".join(sorted(lost)))
            return not self._decide(assignment)
        return True

    def _decide(self, assignment: Assignment) -> bool:
        """Read every report; cut off whom they name. True when a round was opened for it."""
        prefix = self.settings.reach_prefix
        try:
            kvs, _ = self.store.get_prefix(prefix)
            reports = {kv.key[len(prefix):]: kv.value for kv in kvs}
            cut = reachability.decide(reports, assignment.node_ids, assignment.round)
            if not cut:
                return False
            names = ", ".join(sorted(cut))
            why = reason_text(Reason.UNREACHABLE, f"{names} (its ring neighbours cannot reach it)")
            if open_next_round(self.store, self.settings, why, assignment.round, left_out=tuple(sorted(cut))):
                log.warning("round %d: %s cut off from its peers (no answer to its ring neighbours' probes); "
                            "opened round %d without it", assignment.round, names, assignment.round + 1)
            return True
        except (RendezvousError, CorruptStateError) as exc:
            log.warning("could not act on the peers' reports (%s); retrying", exc)
            return False

    def _publish(self, report: reachability.Report) -> bool:
        """Put (or, when it names nobody, delete) reach/<me> on the membership lease."""
        session = getattr(self._participant(), "session", None)
        if session is None:
            return False
        key = self.settings.reach_prefix + self.me
        try:
            if report.unreachable or report.kept_out:
                self.store.put(key, report.encode(), lease=session.lease)
            elif self.published.unreachable or self.published.kept_out:
                self.store.delete(key)
        except RendezvousError as exc:
            log.warning("could not publish this node's reachability (%s); retrying", exc)
            return False
        self.published = report
        return True

    # --- joining ---------------------------------------------------------------------------
    def admit(self, rnd: RoundState) -> float | None:
        """May this node join now (None), or when to ask again. A member of ``rnd`` (or of the
        round it reopens) and the job's first nodes join at once; any other node first hears
        from the members it would neighbour. A node that failed (left out, or kept out) must
        hear them steadily for ``READMIT_WINDOW``: a lossy link stays out, not in and out."""
        if rnd.is_open:
            members, survivor = rnd.previous, self.me in rnd.previous and self.me not in rnd.left_out
        else:
            members = rnd.assignment.node_ids if rnd.assignment is not None else ()
            survivor = self.me in members
        peers = reachability.prospective_peers([m for m in members if m not in rnd.left_out], self.me)
        if survivor or not peers:
            return None
        self._probe(-rnd.number, peers, refresh=True)  # not a round it trains in: a key of its own
        now = self.clock.monotonic()
        lost = self.prober.unreachable()
        self._lost_since = (self._lost_since or now) if lost else None
        # A member that just died is silent too, until its presence lease runs out: only a
        # verdict that outlives that lease keeps a newcomer out (and says so).
        if self.me in rnd.left_out or self.loss.lossy or (
                lost and now - (self._lost_since or now) >= self.settings.presence_ttl):
            self._keep_out(rnd.number, lost or frozenset(peers))
        if not self.kept_out:
            return None if self.prober.answered_all(self._since) else now + ADMIT_POLL
        if self._window is None or self._window[0] < self._since:
            self._window = (now, self.prober.totals())
        start, before = self._window
        if now - start < READMIT_WINDOW:
            return now + ADMIT_POLL
        if not lost and self.me not in rnd.left_out and steady(before, self.prober.totals(), READMIT_RATIO):
            log.info("peers %s answered steadily for %.0fs: joining again", ", ".join(peers), READMIT_WINDOW)
            self.kept_out, self._window, self.loss.lossy = False, None, False
            self._publish(reachability.Report(rnd.number, ()))
            return None
        self._window = (now, self.prober.totals())  # not yet: judge the next window
        return now + ADMIT_POLL

    def _keep_out(self, number: int, lost: frozenset[str]) -> None:
        """Say once per spell out why this node stays out (log, metric, report for status)."""
        if self.kept_out:
            return
        self.kept_out = True
        self.failures.inc()
        log.warning("kept out of the job (unreachable): peer(s) %s do not answer this node's probes over "
                    "--node-addr, or cannot reach it; joining once they answer steadily", ", ".join(sorted(lost)))
        self._publish(reachability.Report(number, tuple(sorted(lost)), kept_out=True))

    def close(self) -> None:
        self.prober.close()
        if self.server is not None:
            self.server.close()
