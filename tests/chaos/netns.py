"""Network namespaces for the partition scenarios: a hub namespace holding a bridge, and one
namespace per host joined to it by a veth pair (``eth0`` inside the host, ``h<i>`` on the
bridge). Addresses (10.77.0.0/24) exist only inside these namespaces, and the machine's own
namespace gets no interface, address or route at all: both veth ends are created inside.

Names are ``eachaos-<runner pid>-<tag>-<host>``, and a topology deletes only the namespaces
it created itself: at :meth:`Topology.close`, which the suite calls in ``finally`` and which
is also registered with ``atexit`` (a crash, Ctrl-C). Deleting a namespace takes its veth ends
with it. What a runner killed outright left (its pid is gone) is removed by the next run:
:func:`sweep` stops the processes still inside, by their pids, and deletes the namespaces. Processes are started inside with :meth:`Topology.wrap` (``ip netns exec``, which
execs in place: the pid we hold is the process itself, so it is stopped by its pid); stop
them before closing, or a namespace lingers, unnamed, until they exit.

A host named in ``relayed`` gets a lossy link instead (tests/chaos/lossy.py): a TAP device
``eth0`` and a TAP port on the bridge, with a relay process between them (started in the
host's namespace, stopped by its pid at :meth:`Topology.close`, before the namespaces go).
:meth:`Topology.set_loss` makes it drop a fraction of the frames to and from given hosts,
as ``tc netem loss`` would (this kernel has no netem); cuts and blocks work on it as on
any host.

Two kinds of cut:
- :meth:`Topology.cut`: the host's port on the bridge goes down. Frames to and from the host
  are dropped silently: no reset, no error, as when a link or a switch dies.
- :meth:`Topology.block`: between two hosts only, both ways, each resolves the other's
  address to a MAC address nobody has (a permanent neighbour entry): their frames go
  nowhere, silently, while everything else (etcd) still answers. TCP between them stalls
  (a connect hangs, a collective waits); nothing is refused or reset. (A blackhole route
  would refuse a connect at once with EINVAL, and this kernel has no tc drop action.)
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.waiting import alive

PREFIX = "eachaos-"
SUBNET = "10.77.0"
NOWHERE_MAC = "02:ea:00:00:00:01"  # locally administered; no interface of the topology has it
IP_TIMEOUT_S = 10.0
RELAY = Path(__file__).with_name("lossy.py")
RELAY_WAIT_S = 15.0  # a cold python starting on 2 loaded cores


class NetnsError(RuntimeError):
    """An `ip` command failed: the message has the command and what it printed."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def existing_namespaces() -> set[str]:
    out = ip("netns", "list").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        existing_namespaces()
    except (OSError, NetnsError, subprocess.TimeoutExpired) as exc:
        return f"ip netns does not work here: {exc}"
    return None


def sweep() -> list[str]:
    """Remove the namespaces of chaos runs that are dead (the pid in the name is gone): SIGKILL
    each process still inside, by the pid ``ip netns pids`` names, then delete. Returns them."""
    removed = []
    for ns in sorted(existing_namespaces()):
        if not ns.startswith(PREFIX):
            continue
        owner = ns[len(PREFIX):].split("-", 1)[0]
        if owner.isdigit() and (int(owner) == os.getpid() or alive(int(owner))):
            continue  # a live run's (or ours): not touched
        for pid in ip("netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        ip("netns", "del", ns, check=False)
        removed.append(ns)
    return removed


@dataclass(frozen=True)
class Host:
    name: str
    ns: str
    addr: str
    port: str  # its interface on the hub's bridge


class Topology:
    """``with Topology(["e0", "n0", ...]) as net:``; hosts are numbered from ``first``
    (10.77.0.<first + i>) in the order given."""

    def __init__(self, hosts: list[str], *, first: int = 11, tag: str = "0", relayed: tuple[str, ...] = ()) -> None:
        tag = f"{os.getpid()}-{tag}"  # the runner's pid first: sweep() tells a dead run's from a live one's
        self.hub = f"{PREFIX}{tag}-hub"
        self.hosts = {name: Host(name, f"{PREFIX}{tag}-{name}", f"{SUBNET}.{first + i}", f"h{i}")
                      for i, name in enumerate(hosts)}
        unknown = set(relayed) - set(self.hosts)
        if unknown:
            raise NetnsError(f"relayed hosts {sorted(unknown)}: expected some of {hosts}")
        self.relayed = tuple(relayed)
        self._relays: dict[str, subprocess.Popen[str]] = {}
        self._created: list[str] = []
        self._blocked: set[tuple[str, str]] = set()

    def __enter__(self) -> Topology:
        atexit.register(self.close)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_namespace(self, ns: str) -> None:
        if ns in existing_namespaces():
            raise NetnsError(f"network namespace {ns} exists already (not ours): not touching it")
        ip("netns", "add", ns)
        self._created.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def _create(self) -> None:
        self._add_namespace(self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        for host in self.hosts.values():
            self._add_namespace(host.ns)
            if host.name in self.relayed:
                ip("-n", self.hub, "tuntap", "add", "dev", host.port, "mode", "tap")
                ip("-n", host.ns, "tuntap", "add", "dev", "eth0", "mode", "tap")
            else:
                # Created in the hub, its peer moved straight to the host: never in the root namespace.
                ip("-n", self.hub, "link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            ip("-n", self.hub, "link", "set", host.port, "master", "br0", "up")
            ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            ip("-n", host.ns, "link", "set", "eth0", "up")
            if host.name in self.relayed:
                self._start_relay(host)

    def _start_relay(self, host: Host) -> None:
        proc = subprocess.Popen([*self.wrap(host.name), sys.executable, str(RELAY), "eth0", self.hub, host.port],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        self._relays[host.name] = proc
        said = self._read_line(proc, f"{host.name}'s relay to start")
        if said != "ready":
            raise NetnsError(f"{host.name}'s relay said {said!r}, expected 'ready'")

    @staticmethod
    def _read_line(proc: subprocess.Popen[str], what: str) -> str:
        assert proc.stdout is not None
        deadline = time.monotonic() + RELAY_WAIT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 0.1)[0]:
                return proc.stdout.readline().strip()
        raise NetnsError(f"timed out after {RELAY_WAIT_S}s waiting for {what} (exit {proc.poll()})")

    def _ask_relay(self, name: str, line: str) -> str:
        proc = self._relays.get(name)
        if proc is None:
            raise NetnsError(f"host {name} has no lossy link: name it in relayed=")
        assert proc.stdin is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        said = self._read_line(proc, f"{name}'s relay to answer {line!r}")
        if said.startswith("error"):
            raise NetnsError(f"{name}'s relay: {said}")
        return said

    def _stop_relays(self) -> None:
        """Close each relay's stdin (it ends on that), by its pid if it does not."""
        for proc in self._relays.values():
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        self._relays.clear()

    # --- using it -----------------------------------------------------------------------
    def addr(self, name: str) -> str:
        return self.hosts[name].addr

    def wrap(self, name: str) -> list[str]:
        """The prefix that runs a command inside host ``name``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[name].ns]

    def cut(self, name: str) -> None:
        """Cut ``name`` off from every other host (its bridge port down)."""
        ip("-n", self.hub, "link", "set", self.hosts[name].port, "down")

    def heal(self, name: str) -> None:
        ip("-n", self.hub, "link", "set", self.hosts[name].port, "up")

    def block(self, a: str, b: str) -> None:
        """Drop traffic between hosts ``a`` and ``b`` only, both ways."""
        for src, dst in ((a, b), (b, a)):
            ip("-n", self.hosts[src].ns, "neigh", "replace", self.hosts[dst].addr, "lladdr", NOWHERE_MAC,
               "dev", "eth0", "nud", "permanent")
            self._blocked.add((src, dst))

    def unblock(self, a: str, b: str) -> None:
        for src, dst in ((a, b), (b, a)):
            if (src, dst) in self._blocked:
                ip("-n", self.hosts[src].ns, "neigh", "del", self.hosts[dst].addr, "dev", "eth0")
                self._blocked.discard((src, dst))

    def set_loss(self, name: str, fraction: float, between: list[str] | None = None) -> None:
        """Host ``name``'s link drops ``fraction`` of the frames to and from the hosts
        ``between`` (every frame when None), each on its own chance; 0 mends it."""
        addrs = [self.addr(h) for h in between or []]
        self._ask_relay(name, " ".join(["loss", f"{fraction:g}", *addrs]))

    def loss_count(self, name: str) -> tuple[int, int]:
        """(passed, dropped) frames on ``name``'s lossy link since its last :meth:`set_loss`."""
        words = self._ask_relay(name, "count").split()
        return int(words[1]), int(words[3])

    def close(self) -> None:
        """Stop the relays, delete the namespaces this topology created (host namespaces
        first, the hub last); safe to call twice."""
        self._stop_relays()
        failures = []
        while self._created:
            ns = self._created.pop()
            proc = ip("netns", "del", ns, check=False)
            if proc.returncode != 0 and ns in existing_namespaces():
                failures.append(f"{ns}: {proc.stderr.strip()}")
        atexit.unregister(self.close)
        if failures:
            raise NetnsError("could not delete network namespaces: " + "; ".join(failures))

    def leftovers(self) -> list[str]:
        """This topology's namespaces that still exist (none after close)."""
        mine = {self.hub, *(h.ns for h in self.hosts.values())}
        return sorted(mine & existing_namespaces())
