"""A lossy link for the chaos worlds, in user space: this kernel has neither ``tc netem`` nor
a tc drop action, so a host that must have a bad link gets, instead of a veth pair, two TAP
devices (``eth0`` in the host's namespace, its port on the hub's bridge) and this relay
between them, copying frames both ways and dropping the chosen fraction, each frame on its
own chance, as ``netem loss P%`` does.

Run by tests/chaos/netns.py as ``ip netns exec HOST_NS python lossy.py eth0 HUB_NS PORT``:
it opens ``eth0`` here, enters the hub's namespace (setns), opens ``PORT`` there, says
``ready`` and relays. TAP devices have no offloads, so every frame is a whole one, checksum
done: nothing here has to segment or checksum anything.

Control, one line at a time on stdin, one line of answer on stdout:
  ``loss P [ADDR ...]``  drop a fraction P (0..1) of the IPv4 frames from or to one of the
                         ADDRs (all frames when none is given: ARP too); ``ok``
  ``count``              ``passed N dropped M``: of the frames the loss applies to, since
                         the last ``loss``
End of stdin (the runner closed it, or died) ends the relay. Standalone on purpose: no
import of the project, started cold in a namespace.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import os
import random
import select
import struct
import sys

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
CLONE_NEWNET = 0x40000000
FRAME_MAX = 65536
ETH_IPV4 = b"\x08\x00"


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def enter_namespace(ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Loss:
    """Which frames to drop: pure but for the coin."""

    def __init__(self) -> None:
        self.fraction = 0.0
        self.addrs: frozenset[bytes] = frozenset()
        self.passed = self.dropped = 0

    def set(self, words: list[str]) -> None:
        fraction = float(words[0])
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"loss {fraction}: expected a fraction from 0 to 1")
        addrs = frozenset(ipaddress.IPv4Address(a).packed for a in words[1:])
        self.fraction, self.addrs = fraction, addrs  # both or neither: a bad line changes nothing
        self.passed = self.dropped = 0

    def applies(self, frame: bytes) -> bool:
        if not self.addrs:
            return True
        if len(frame) < 34 or frame[12:14] != ETH_IPV4:
            return False
        return frame[26:30] in self.addrs or frame[30:34] in self.addrs

    def drop(self, frame: bytes) -> bool:
        """Whether to drop this frame; counts the frames the loss applies to."""
        if not self.applies(frame):
            return False
        if random.random() < self.fraction:
            self.dropped += 1
            return True
        self.passed += 1
        return False


def answer(loss: Loss, line: str) -> str:
    words = line.split()
    try:
        if words[:1] == ["loss"] and len(words) >= 2:
            loss.set(words[1:])
            return "ok"
        if words == ["count"]:
            return f"passed {loss.passed} dropped {loss.dropped}"
    except ValueError as exc:
        return f"error: {exc}"
    return f"error: {line.strip()!r}: expected 'loss P [ADDR ...]' or 'count'"


def relay(here: int, there: int, loss: Loss) -> None:
    other = {here: there, there: here}
    control = sys.stdin.fileno()
    pending = b""
    while True:
        ready, _, _ = select.select([here, there, control], [], [])
        for fd in ready:
            if fd == control:
                data = os.read(control, 4096)
                if not data:
                    return
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    print(answer(loss, line.decode(errors="replace")), flush=True)
                continue
            frame = os.read(fd, FRAME_MAX)
            if frame and not loss.drop(frame):
                try:
                    os.write(other[fd], frame)
                except OSError:  # the other end is down (a cut port): the frame is lost, as on a wire
                    pass


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: lossy.py HERE_TAP THERE_NS THERE_TAP", file=sys.stderr)
        return 2
    here = open_tap(argv[0])
    enter_namespace(argv[1])
    there = open_tap(argv[2])
    print("ready", flush=True)
    relay(here, there, Loss())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
