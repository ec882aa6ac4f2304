"""The key-value store the rendezvous needs: etcd v3's model, reduced to what we use.

Two implementations satisfy it: :mod:`rendezvous.memory_store` (tests, pure logic) and
:mod:`rendezvous.etcd.store` (the only module that talks to etcd). The contract suite in
``tests/contract`` runs against both.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol

PUT = "put"
DELETE = "delete"


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Event:
    kind: str  # PUT or DELETE
    key: str
    value: bytes
    create_revision: int
    mod_revision: int


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    reads: tuple[KV | None, ...] = ()


EventsCallback = Callable[[list[Event]], None]
ErrorCallback = Callable[[Exception], None]


class Watch(Protocol):
    def cancel(self) -> None: ...


class Store(Protocol):
    """Every method is one request to the store (the etcd adapter may retry it)."""

    def get(self, key: str) -> tuple[KV | None, int]:
        """The key (or None) and the store revision it was read at."""

    def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under the prefix, ordered by key, and the revision read at."""

    def predecessor(self, prefix: str, create_revision: int) -> KV | None:
        """The key under ``prefix`` created last before ``create_revision`` (etcd election order)."""

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write unconditionally; returns the revision of the write."""

    def replace(self, key: str, value: bytes, mod_revision: int, lease: int = 0) -> int | None:
        """Compare-and-swap: write only if the key's mod-revision is ``mod_revision``
        (0: only if absent). Returns the new revision, or None when the comparison failed."""

    def commit(self, compares: list[tuple[str, int]], puts: list[tuple[str, bytes]], lease: int = 0,
               reads: tuple[str, ...] = ()) -> TxnResult:
        """One transaction: if every key's mod-revision matches (0: absent), write every put
        (attached to ``lease``). Either way read the keys in ``reads`` after it."""

    def count_prefix(self, prefix: str) -> int:
        """How many keys are under the prefix (counted by the store, nothing transferred)."""

    def get_or_create(self, key: str, value: bytes) -> KV:
        """Create the key if absent; either way return what it holds now (one transaction)."""

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def grant(self, ttl: float) -> int:
        """A new lease; returns its id."""

    def keepalive(self, lease: int) -> float:
        """Refresh the lease; returns its remaining TTL, raises LeaseLostError if it is gone."""

    def revoke(self, lease: int) -> None:
        """Revoke the lease; every key attached to it is deleted at once."""

    def watch(self, key: str, on_events: EventsCallback, on_error: ErrorCallback,
              start_revision: int, prefix: bool = False) -> Watch:
        """Report every change to the key (or prefix) from ``start_revision`` on, in order.

        Callbacks run on the store's thread and must only record or enqueue. ``on_error``
        is called at most once, after which the watch is dead and must be re-created.
        """

    def close(self) -> None: ...


class RequestCounter:
    """Counts requests by type; shared by both stores so the benchmark and tests can read it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._counts[kind] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())
