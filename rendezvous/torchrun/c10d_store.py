"""A c10d store on etcd: what torchrun's agents share in a round lives in etcd, not in one agent.

After each rendezvous torchrun hands its agent a ``torch.distributed.Store`` (it assigns
worker ranks through it and runs its exit barrier on it). torch's c10d backend makes that a
TCPStore inside one agent, so losing that node loses the store. This one keeps every key in
etcd under the round's prefix, ``rounds/<n>/c10d/``: any node may go, and the keys go with the
round (the coordinator of round n+1 deletes ``rounds/<n>/`` when it closes it).

Semantics are torch's TCPStore/HashStore ones: values are bytes; ``add`` keeps a decimal
counter (compare-and-swap on its mod-revision, so concurrent adds never lose one);
``compare_set`` writes ``desired`` when the key holds ``expected`` (or is absent and
``expected`` is empty) and returns what the key holds afterwards; ``get`` and ``wait`` block
until the key exists or the timeout passes, on an etcd watch that starts just after the
revision they read (no polling). A wait also ends when its round is over (the ``round`` key
moved on): a peer it waits for may be gone for good, and the round's agents are about to
rendezvous again, so waiting out the timeout (300 s by default) would only hold that up.

:class:`RoundKeys` holds all of it and needs no torch, so ``rendezvous/`` stays importable
without it; :func:`c10d_store` wraps it in a ``torch.distributed.Store`` subclass built on
first use (``EtcdC10dStore``, also importable by that name).
"""

from __future__ import annotations

import functools
import queue
import random
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from rendezvous.clock import Clock, SystemClock
from rendezvous.errors import CorruptStateError, RendezvousError, RendezvousTimeoutError
from rendezvous.settings import Settings
from rendezvous.state import RoundState
from rendezvous.store import PUT, Event, Store

DEFAULT_TIMEOUT = 300.0  # torch's default store timeout, seconds
# A lost compare-and-swap waits a random part of a doubling window before it tries again:
# at torch's exit barrier every agent adds to one counter at once, and N agents retrying at
# once cost O(N^2) transactions (each round of retries lets one through).
BACKOFF_FIRST_S = 0.005
BACKOFF_MAX_S = 0.5


class RoundOverError(RendezvousError):
    """A wait ended because its round is over: nothing more will be written under its prefix."""


class RoundKeys:
    """One round's c10d keys in etcd, with torch's store semantics (keys without the prefix)."""

    def __init__(self, store: Store, settings: Settings, round_number: int, clock: Clock | None = None) -> None:
        self.store = store
        self.round_number = round_number
        self.prefix = f"{settings.round_prefix(round_number)}c10d/"
        self._round_key = settings.round_key
        self.clock = clock or SystemClock()
        self.added: set[str] = set()  # keys this node added to (torchrun's exit barrier counts)

    def full(self, key: str) -> str:
        return self.prefix + key

    def set(self, key: str, value: bytes) -> None:
        self.store.put(self.full(key), value)

    def multi_set(self, keys: Sequence[str], values: Sequence[bytes]) -> None:
        """Every key in one transaction."""
        if len(keys) != len(values):
            raise ValueError(f"multi_set: {len(keys)} keys but {len(values)} values")
        self.store.commit([], [(self.full(k), v) for k, v in zip(keys, values)])

    def get(self, key: str, timeout: float) -> bytes:
        return self._await(key, self.clock.monotonic() + timeout, timeout)

    def multi_get(self, keys: Sequence[str], timeout: float) -> list[bytes]:
        """Wait for every key, then read them all in one transaction."""
        self.wait(keys, timeout)
        result = self.store.commit([], [], reads=tuple(self.full(k) for k in keys))
        if any(kv is None for kv in result.reads):  # deleted since: the round is being cleaned up
            gone = [k for k, kv in zip(keys, result.reads) if kv is None]
            raise RoundOverError(f"c10d keys {gone} under {self.prefix} vanished (round {self.round_number} is over)")
        return [kv.value for kv in result.reads if kv is not None]

    def _backoff(self, lost: int) -> None:
        """After the ``lost``-th lost compare-and-swap: full jitter over a doubling window."""
        window = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * (2 ** min(lost - 1, 16)))
        self.clock.sleep(random.uniform(0.0, window))

    def _swap(self, key: str, change: Callable[[Any], tuple[bytes | None, Any]]) -> Any:
        """Read-modify-write ``key`` until nobody wrote it in between (a compare-and-swap on its
        revision, backing off after each lost one). ``change(kv)`` gives (the bytes to write,
        the result), or (None, the result) to return without writing."""
        full = self.full(key)
        lost = 0
        while True:
            kv, _ = self.store.get(full)
            new, result = change(kv)
            if new is None or self.store.replace(full, new, kv.mod_revision if kv else 0) is not None:
                return result
            lost += 1
            self._backoff(lost)

    def add(self, key: str, amount: int) -> int:
        def change(kv: Any) -> tuple[bytes, int]:
            total = (_counter(self.full(key), kv.value) if kv is not None else 0) + amount
            return str(total).encode(), total

        total = self._swap(key, change)
        self.added.add(key)
        return total

    def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        def change(kv: Any) -> tuple[bytes | None, bytes]:
            if kv is None and expected:
                return None, expected  # absent, and the caller expected a value: torch returns ``expected``
            if kv is not None and kv.value != expected:
                return None, kv.value
            return desired, desired

        return self._swap(key, change)

    def append(self, key: str, value: bytes) -> None:
        self._swap(key, lambda kv: ((kv.value if kv is not None else b"") + value, None))

    def check(self, keys: Sequence[str]) -> bool:
        return all(self.store.get(self.full(k))[0] is not None for k in keys)

    def delete_key(self, key: str) -> bool:
        kv, _ = self.store.get(self.full(key))
        if kv is None:
            return False
        self.store.delete(self.full(key))
        return True

    def num_keys(self) -> int:
        return self.store.count_prefix(self.prefix)

    def wait(self, keys: Sequence[str], timeout: float) -> None:
        deadline = self.clock.monotonic() + timeout
        for key in keys:
            self._await(key, deadline, timeout)

    def _await(self, key: str, deadline: float, timeout: float) -> bytes:
        """The key's value once it exists; watches the key and the round key from the revision
        read, and reads again whenever a watch breaks."""
        full = self.full(key)
        while True:
            read = self.store.commit([], [], reads=(full, self._round_key))
            kv, round_kv = read.reads
            if kv is not None:
                return kv.value
            self._check_round(round_kv.key if round_kv else self._round_key, round_kv.value if round_kv else None)
            events: queue.Queue[tuple[str, list[Event] | Exception]] = queue.Queue()
            watches = [
                self.store.watch(full, lambda evs: events.put(("key", evs)), lambda exc: events.put(("error", exc)),
                                 read.revision + 1),
                self.store.watch(self._round_key, lambda evs: events.put(("round", evs)),
                                 lambda exc: events.put(("error", exc)), read.revision + 1),
            ]
            try:
                value = self._next_value(events, deadline, timeout, full)
            finally:
                for watch in watches:
                    try:
                        watch.cancel()
                    except RendezvousError:
                        pass  # its stream is gone already
            if value is not None:
                return value

    def _next_value(self, events: queue.Queue[tuple[str, Any]], deadline: float, timeout: float,
                    full: str) -> bytes | None:
        """The value put on ``full``; None when a watch broke (read again)."""
        while True:
            try:
                kind, payload = events.get(timeout=max(0.0, deadline - self.clock.monotonic()))
            except queue.Empty:
                raise RendezvousTimeoutError(f"c10d store: key {full!r} not set within {timeout:g}s") from None
            if kind == "error":
                return None
            for ev in payload:
                if kind == "key" and ev.kind == PUT:
                    return ev.value
                if kind == "round":
                    self._check_round(ev.key, ev.value if ev.kind == PUT else None)

    def _check_round(self, key: str, raw: bytes | None) -> None:
        current = RoundState.decode(key, raw) if raw is not None else None
        if current is None or current.number != self.round_number or current.is_open:
            now = f"round {current.number} ({current.state})" if current else "no round"
            raise RoundOverError(f"round {self.round_number} is over (etcd holds {now}): "
                                 f"its c10d keys under {self.prefix} will not be written")


def _counter(key: str, raw: bytes) -> int:
    try:
        return int(raw)
    except ValueError:
        raise CorruptStateError(key, "a decimal counter (c10d add)", repr(raw[:40])) from None


def as_bytes(value: Any) -> bytes:
    """What torch passes as a value (str from Python, bytes or a list of ints from C++) as bytes."""
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


def c10d_store(keys: RoundKeys, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """A ``torch.distributed.Store`` on ``keys`` whose waits default to ``timeout`` seconds."""
    return store_class()(keys, timeout)


@functools.cache
def store_class() -> type:
    """``EtcdC10dStore``: built on first use, so importing this module does not import torch."""
    import torch.distributed as dist  # noqa: PLC0415 - only torchrun (and tests) load this

    class EtcdC10dStore(dist.Store):
        """torch's Store API on :class:`RoundKeys`; our errors become ``DistStoreError``.
        C++ callers (PrefixStore, ProcessGroupGloo) reach set/get/add/compare_set/wait/check."""

        def __init__(self, keys: RoundKeys, timeout: float = DEFAULT_TIMEOUT) -> None:
            super().__init__()
            self.keys = keys
            self.set_timeout(timedelta(seconds=timeout))

        def _seconds(self, timeout: timedelta | None) -> float:
            return (timeout if timeout is not None else self.timeout).total_seconds()

        def set(self, key: str, value: Any) -> None:
            _torch_errors(self.keys.set, key, as_bytes(value))

        def get(self, key: str) -> bytes:
            return _torch_errors(self.keys.get, key, self._seconds(None))

        def add(self, key: str, amount: int) -> int:
            return _torch_errors(self.keys.add, key, int(amount))

        def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
            return _torch_errors(self.keys.compare_set, key, as_bytes(expected), as_bytes(desired))

        def append(self, key: str, value: Any) -> None:
            _torch_errors(self.keys.append, key, as_bytes(value))

        def multi_set(self, keys: list[str], values: list[Any]) -> None:
            _torch_errors(self.keys.multi_set, list(keys), [as_bytes(v) for v in values])

        def multi_get(self, keys: list[str]) -> list[bytes]:
            return _torch_errors(self.keys.multi_get, list(keys), self._seconds(None))

        def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
            _torch_errors(self.keys.wait, list(keys), self._seconds(timeout))

        def check(self, keys: list[str]) -> bool:
            return _torch_errors(self.keys.check, list(keys))

        def delete_key(self, key: str) -> bool:
            return _torch_errors(self.keys.delete_key, key)

        def num_keys(self) -> int:
            return _torch_errors(self.keys.num_keys)

        def __repr__(self) -> str:
            return f"EtcdC10dStore(prefix={self.keys.prefix!r})"

    def _torch_errors(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except RendezvousError as exc:  # torch's callers (barriers, the agent) catch DistStoreError
            raise dist.DistStoreError(str(exc)) from exc

    return EtcdC10dStore


def __getattr__(name: str) -> Any:
    if name == "EtcdC10dStore":
        return store_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
