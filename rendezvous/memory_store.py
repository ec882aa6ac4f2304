"""An in-memory store with etcd's semantics (revisions, leases, watches), for tests.

It is what the contract suite holds etcd to, and what pure-logic tests run against.
Lease expiry follows the injected clock: call :meth:`MemoryStore.expire_leases` after
advancing a fake clock, or let the reaper thread do it with the system clock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from rendezvous.clock import Clock, SystemClock
from rendezvous.errors import LeaseLostError, StoreUnavailableError
from rendezvous.store import DELETE, KV, PUT, ErrorCallback, Event, EventsCallback, RequestCounter, TxnResult


@dataclass
class _Lease:
    ttl: float
    expires_at: float
    keys: set[str] = field(default_factory=set)


@dataclass
class _Watcher:
    key: str
    prefix: bool
    on_events: EventsCallback
    on_error: ErrorCallback
    cancelled: bool = False

    def matches(self, key: str) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key

    def cancel(self) -> None:
        self.cancelled = True


class MemoryStore:
    def __init__(self, clock: Clock | None = None, reap_interval: float | None = 0.05) -> None:
        self.clock = clock or SystemClock()
        self.requests = RequestCounter()
        self._lock = threading.RLock()
        self._dispatch = threading.Lock()  # keeps callbacks in revision order
        self._revision = 1
        self._data: dict[str, KV] = {}
        self._history: list[Event] = []
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 1
        self._watchers: list[_Watcher] = []
        self._pending: list[tuple[_Watcher, list[Event]]] = []
        self._bumped = False
        self._closed = threading.Event()
        self.available = True  # tests flip this to simulate an outage
        if reap_interval is not None:
            threading.Thread(target=self._reap, args=(reap_interval,), daemon=True,
                             name="memory-store-reaper").start()

    # --- reads -------------------------------------------------------------------------
    def get(self, key: str) -> tuple[KV | None, int]:
        with self._request("get"):
            return self._data.get(key), self._revision

    def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        with self._request("get_prefix"):
            return [self._data[k] for k in sorted(self._data) if k.startswith(prefix)], self._revision

    def predecessor(self, prefix: str, create_revision: int) -> KV | None:
        with self._request("predecessor"):
            older = [kv for k, kv in self._data.items()
                     if k.startswith(prefix) and kv.create_revision < create_revision]
            return max(older, key=lambda kv: kv.create_revision, default=None)

    # --- writes ------------------------------------------------------------------------
    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        with self._request("put"):
            return self._write(key, value, lease)

    def replace(self, key: str, value: bytes, mod_revision: int, lease: int = 0) -> int | None:
        with self._request("txn"):
            current = self._data.get(key)
            if (current.mod_revision if current else 0) != mod_revision:
                return None
            return self._write(key, value, lease)

    def commit(self, compares: list[tuple[str, int]], puts: list[tuple[str, bytes]], lease: int = 0,
               reads: tuple[str, ...] = ()) -> TxnResult:
        with self._request("txn"):
            ok = all((self._data[k].mod_revision if k in self._data else 0) == rev for k, rev in compares)
            if ok:
                for key, value in puts:
                    self._write(key, value, lease)
            return TxnResult(ok, self._revision, tuple(self._data.get(k) for k in reads))

    def count_prefix(self, prefix: str) -> int:
        with self._request("count"):
            return sum(1 for k in self._data if k.startswith(prefix))

    def get_or_create(self, key: str, value: bytes) -> KV:
        with self._request("txn"):
            if key not in self._data:
                self._write(key, value, 0)
            return self._data[key]

    def delete(self, key: str) -> None:
        with self._request("delete"):
            self._remove(key)

    def delete_prefix(self, prefix: str) -> None:
        with self._request("delete"):
            for key in [k for k in self._data if k.startswith(prefix)]:
                self._remove(key)

    # --- leases ------------------------------------------------------------------------
    def grant(self, ttl: float) -> int:
        with self._request("lease_grant"):
            lease_id = self._next_lease
            self._next_lease += 1
            self._leases[lease_id] = _Lease(ttl, self.clock.monotonic() + ttl)
            return lease_id

    def keepalive(self, lease: int) -> float:
        with self._request("lease_keepalive"):
            held = self._leases.get(lease)
            if held is None:
                raise LeaseLostError(f"lease {lease:x} expired or was revoked")
            held.expires_at = self.clock.monotonic() + held.ttl
            return held.ttl

    def revoke(self, lease: int) -> None:
        with self._request("lease_revoke"):
            held = self._leases.pop(lease, None)
            for key in sorted(held.keys) if held else ():
                self._remove(key)

    def expire_leases(self) -> None:
        with self._lock:
            now = self.clock.monotonic()
            for lease_id in [i for i, l in self._leases.items() if l.expires_at <= now]:
                self._bumped = False  # each expired lease is revoked as one request
                for key in sorted(self._leases.pop(lease_id).keys):
                    self._remove(key)
        self._flush()

    # --- watches -----------------------------------------------------------------------
    def watch(self, key: str, on_events: EventsCallback, on_error: ErrorCallback,
              start_revision: int, prefix: bool = False) -> _Watcher:
        with self._request("watch"):
            watcher = _Watcher(key, prefix, on_events, on_error)
            past = [e for e in self._history if e.mod_revision >= start_revision and watcher.matches(e.key)]
            self._watchers.append(watcher)
            self._pending.append((watcher, past))
        return watcher

    def fail_watches(self) -> None:
        """Break every watch, as a lost connection to etcd would."""
        with self._lock:
            watchers, self._watchers = self._watchers, []
        for w in watchers:
            if not w.cancelled:
                w.on_error(StoreUnavailableError("watch stream lost"))

    def close(self) -> None:
        self._closed.set()

    # --- internals ---------------------------------------------------------------------
    def _request(self, kind: str) -> "_Request":
        return _Request(self, kind)

    def _bump(self) -> None:
        """etcd gives every change made by one request the same revision."""
        if not self._bumped:
            self._revision += 1
            self._bumped = True

    def _write(self, key: str, value: bytes, lease: int) -> int:
        if lease and lease not in self._leases:
            raise LeaseLostError(f"lease {lease:x} expired or was revoked")
        self._bump()
        old = self._data.get(key)
        if old and old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        kv = KV(key, value, old.create_revision if old else self._revision, self._revision, lease)
        self._data[key] = kv
        if lease:
            self._leases[lease].keys.add(key)
        self._emit(Event(PUT, key, value, kv.create_revision, self._revision))
        return self._revision

    def _remove(self, key: str) -> None:
        old = self._data.pop(key, None)
        if old is None:
            return
        self._bump()
        if old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)
        self._emit(Event(DELETE, key, b"", 0, self._revision))

    def _emit(self, event: Event) -> None:
        self._history.append(event)
        self._watchers = [w for w in self._watchers if not w.cancelled]
        for w in self._watchers:
            if w.matches(event.key):
                self._pending.append((w, [event]))

    def _flush(self) -> None:
        with self._dispatch:
            with self._lock:
                pending, self._pending = self._pending, []
            for watcher, events in pending:
                if events and not watcher.cancelled:
                    watcher.on_events(events)

    def _reap(self, interval: float) -> None:
        while not self._closed.wait(interval):
            self.expire_leases()


class _Request:
    """One request: checks availability, counts it, holds the lock, then dispatches events."""

    def __init__(self, store: MemoryStore, kind: str) -> None:
        self.store = store
        self.kind = kind

    def __enter__(self) -> None:
        store = self.store
        store.requests.add(self.kind)
        if not store.available:
            raise StoreUnavailableError(f"store unavailable ({self.kind})")
        store._lock.acquire()
        store._bumped = False

    def __exit__(self, *exc: object) -> None:
        self.store._lock.release()
        self.store._flush()
