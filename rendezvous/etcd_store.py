"""The one module that talks to etcd.

We use only the generated gRPC stubs of the ``python3-etcd3`` distribution (``etcd3.etcdrpc``),
not its client class: its watch thread dies on a lost stream and it refuses a failed endpoint
for five minutes (see docs/architecture.md). This adapter owns endpoint failover, gRPC
keepalive (so a hung server or a cut link is noticed), bounded retries (tenacity), request
counting, and translating every client error into ours.
"""

from __future__ import annotations

import collections
import math
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import grpc
import tenacity
from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from rendezvous.errors import LeaseLostError, RendezvousError, StoreUnavailableError
from rendezvous.store import DELETE, KV, PUT, ErrorCallback, Event, EventsCallback, RequestCounter, TxnResult

log = logging.getLogger(__name__)
T = TypeVar("T")

# Verified against etcd 3.5 with grpcio 1.85: a hung server or cut link is noticed in ~6.6 s.
# keepalive_time below 5 s makes etcd (--grpc-keepalive-min-time) drop the stream.
GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.ping_timeout_ms", 2000),
]
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def parse_endpoints(text: str) -> tuple[tuple[str, int], ...]:
    """``host:port[,host:port...]`` (an ``http://`` prefix is allowed) -> ((host, port), ...)."""
    out = []
    for item in text.split(","):
        item = item.strip().removeprefix("http://")
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"etcd endpoint {item!r} must be host:port")
        out.append((host, int(port)))
    if not out:
        raise ValueError("etcd endpoints must not be empty")
    return tuple(out)


def _range_end(prefix: bytes) -> bytes:
    raw = bytearray(prefix)
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return bytes(raw[: i + 1])
    return b"\0"


def _kv(kv: Any) -> KV:
    return KV(kv.key.decode(), bytes(kv.value), kv.create_revision, kv.mod_revision, kv.lease)


class EtcdStore:
    """A :class:`~rendezvous.store.Store` backed by an etcd v3 cluster."""

    def __init__(self, endpoints: tuple[tuple[str, int], ...] | str, *, request_timeout: float = 2.0,
                 retry_for: float = 5.0, counter: RequestCounter | None = None,
                 observer: Callable[[str, float, BaseException | None], None] | None = None) -> None:
        self.endpoints = parse_endpoints(endpoints) if isinstance(endpoints, str) else tuple(endpoints)
        self.request_timeout = request_timeout
        self.retry_for = retry_for
        self.requests = counter or RequestCounter()
        self.observer = observer  # (request kind, seconds, error or None) after every attempt
        self._lock = threading.Lock()
        self._index = 0
        self._channel: grpc.Channel | None = None
        self._stubs: tuple[Any, Any, Any] | None = None
        self._watches = _WatchStream(self)
        self._keepalives = _KeepAliveStream(self)
        self._closed = False

    # --- plumbing ----------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self.endpoints[self._index]
        return f"{host}:{port}"

    def _current(self) -> tuple[Any, Any, Any]:
        with self._lock:
            if self._closed:
                raise StoreUnavailableError("etcd store is closed")
            if self._stubs is None:
                self._channel = grpc.insecure_channel(self.endpoint, options=GRPC_OPTIONS)
                self._stubs = (etcdrpc.KVStub(self._channel), etcdrpc.LeaseStub(self._channel),
                               etcdrpc.WatchStub(self._channel))
            return self._stubs

    def _fail_over(self) -> None:
        """Drop the channel and move to the next endpoint (the same one when there is one)."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = None
            self._stubs = None
            self._index = (self._index + 1) % len(self.endpoints)

    def _call(self, kind: str, fn: Callable[[Any, Any, Any], T], retry_for: float | None = None) -> T:
        """Run one request with bounded retries on unavailability, translating errors."""
        retry_for = self.retry_for if retry_for is None else retry_for

        def attempt() -> T:
            self.requests.add(kind)
            began = time.monotonic()
            try:
                result = fn(*self._current())
            except grpc.RpcError as exc:
                self._observe(kind, began, exc)
                if exc.code() in _RETRYABLE:
                    self._fail_over()
                    raise _Retry(f"{kind} on {self.endpoint}: {exc.code().name}: {exc.details()}") from exc
                raise _translate(kind, exc) from exc
            self._observe(kind, began, None)
            return result

        try:
            return tenacity.Retrying(
                retry=tenacity.retry_if_exception_type(_Retry),
                stop=tenacity.stop_after_delay(retry_for),
                wait=tenacity.wait_exponential(multiplier=0.05, max=0.5),
                reraise=True,
            )(attempt)
        except _Retry as exc:
            raise StoreUnavailableError(
                f"etcd unreachable at {','.join(f'{h}:{p}' for h, p in self.endpoints)} "
                f"for {retry_for}s ({exc})"
            ) from exc

    # --- KV ------------------------------------------------------------------------------
    def get(self, key: str) -> tuple[KV | None, int]:
        req = etcdrpc.RangeRequest(key=key.encode())
        resp = self._call("range", lambda kv, _l, _w: kv.Range(req, timeout=self.request_timeout))
        return (_kv(resp.kvs[0]) if resp.kvs else None), resp.header.revision

    def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        raw = prefix.encode()
        req = etcdrpc.RangeRequest(key=raw, range_end=_range_end(raw))
        resp = self._call("range", lambda kv, _l, _w: kv.Range(req, timeout=self.request_timeout))
        return [_kv(item) for item in resp.kvs], resp.header.revision

    def predecessor(self, prefix: str, create_revision: int) -> KV | None:
        raw = prefix.encode()
        req = etcdrpc.RangeRequest(
            key=raw, range_end=_range_end(raw), limit=1,
            max_create_revision=create_revision - 1,
            sort_order=etcdrpc.RangeRequest.DESCEND, sort_target=etcdrpc.RangeRequest.CREATE,
        )
        resp = self._call("range", lambda kv, _l, _w: kv.Range(req, timeout=self.request_timeout))
        return _kv(resp.kvs[0]) if resp.kvs else None

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        req = etcdrpc.PutRequest(key=key.encode(), value=value, lease=lease)
        resp = self._call("put", lambda kv, _l, _w: kv.Put(req, timeout=self.request_timeout))
        return resp.header.revision

    def replace(self, key: str, value: bytes, mod_revision: int, lease: int = 0) -> int | None:
        raw = key.encode()
        compare = etcdrpc.Compare(key=raw, result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.MOD,
                                  mod_revision=mod_revision)
        put = etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=raw, value=value, lease=lease))
        req = etcdrpc.TxnRequest(compare=[compare], success=[put])
        resp = self._call("txn", lambda kv, _l, _w: kv.Txn(req, timeout=self.request_timeout))
        return resp.header.revision if resp.succeeded else None

    def commit(self, compares: list[tuple[str, int]], puts: list[tuple[str, bytes]], lease: int = 0,
               reads: tuple[str, ...] = ()) -> TxnResult:
        read_ops = [etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=k.encode())) for k in reads]
        req = etcdrpc.TxnRequest(
            compare=[etcdrpc.Compare(key=k.encode(), result=etcdrpc.Compare.EQUAL,
                                     target=etcdrpc.Compare.MOD, mod_revision=rev) for k, rev in compares],
            success=[etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=k.encode(), value=v, lease=lease))
                     for k, v in puts] + read_ops,
            failure=read_ops,
        )
        resp = self._call("txn", lambda kv, _l, _w: kv.Txn(req, timeout=self.request_timeout))
        ranges = [r.response_range for r in resp.responses[len(resp.responses) - len(reads):]] if reads else []
        return TxnResult(resp.succeeded, resp.header.revision,
                         tuple(_kv(r.kvs[0]) if r.kvs else None for r in ranges))

    def count_prefix(self, prefix: str) -> int:
        raw = prefix.encode()
        req = etcdrpc.RangeRequest(key=raw, range_end=_range_end(raw), count_only=True)
        return self._call("range", lambda kv, _l, _w: kv.Range(req, timeout=self.request_timeout)).count

    def get_or_create(self, key: str, value: bytes) -> KV:
        raw = key.encode()
        absent = etcdrpc.Compare(key=raw, result=etcdrpc.Compare.EQUAL, target=etcdrpc.Compare.CREATE,
                                 create_revision=0)
        put = etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=raw, value=value))
        read = etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=raw))
        req = etcdrpc.TxnRequest(compare=[absent], success=[put, read], failure=[read])
        resp = self._call("txn", lambda kv, _l, _w: kv.Txn(req, timeout=self.request_timeout))
        return _kv(resp.responses[-1].response_range.kvs[0])

    def delete(self, key: str) -> None:
        req = etcdrpc.DeleteRangeRequest(key=key.encode())
        self._call("delete", lambda kv, _l, _w: kv.DeleteRange(req, timeout=self.request_timeout))

    def delete_prefix(self, prefix: str) -> None:
        raw = prefix.encode()
        req = etcdrpc.DeleteRangeRequest(key=raw, range_end=_range_end(raw))
        self._call("delete", lambda kv, _l, _w: kv.DeleteRange(req, timeout=self.request_timeout))

    # --- leases ----------------------------------------------------------------------------
    def grant(self, ttl: float) -> int:
        req = etcdrpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))  # never shorter than asked
        resp = self._call("lease_grant", lambda _k, lease, _w: lease.LeaseGrant(req, timeout=self.request_timeout))
        if resp.error:
            raise RendezvousError(f"etcd refused a lease of {ttl}s: {resp.error}")
        return resp.ID

    def keepalive(self, lease: int) -> float:
        """Refresh over one long-lived keep-alive stream shared by every lease of this store
        (opening a stream per refresh costs more than the refresh). One attempt: the session
        owns the lease's retry policy and deadline."""
        self.requests.add("lease_keepalive")
        began = time.monotonic()
        try:
            ttl = self._keepalives.refresh(lease, self.request_timeout)
            if ttl <= 0:
                raise LeaseLostError(f"lease {lease:x} expired or was revoked")
        except RendezvousError as exc:
            self._observe("lease_keepalive", began, exc)
            raise
        self._observe("lease_keepalive", began, None)
        return float(ttl)

    def _observe(self, kind: str, began: float, error: BaseException | None) -> None:
        if self.observer is not None:
            try:
                self.observer(kind, time.monotonic() - began, error)
            except Exception:  # noqa: BLE001 - metrics never break a request
                log.debug("request observer failed", exc_info=True)

    def revoke(self, lease: int) -> None:
        req = etcdrpc.LeaseRevokeRequest(ID=lease)
        try:
            self._call("lease_revoke", lambda _k, stub, _w: stub.LeaseRevoke(req, timeout=self.request_timeout))
        except LeaseLostError:
            pass  # already gone: the goal of a revoke

    # --- watches ----------------------------------------------------------------------------
    def watch(self, key: str, on_events: EventsCallback, on_error: ErrorCallback,
              start_revision: int, prefix: bool = False) -> _EtcdWatch:
        raw = key.encode()
        return self._watches.add(raw, _range_end(raw) if prefix else b"", start_revision, on_events, on_error)

    def close(self) -> None:
        self._watches.close()
        self._keepalives.close()
        with self._lock:
            self._closed = True
            if self._channel is not None:
                self._channel.close()
            self._channel = None
            self._stubs = None


class _Retry(Exception):
    pass


def _translate(kind: str, exc: grpc.RpcError) -> RendezvousError:
    details = exc.details() or ""
    if "lease not found" in details or "requested lease not found" in details:
        return LeaseLostError(f"{kind}: lease expired or was revoked")
    return StoreUnavailableError(f"etcd {kind} failed: {exc.code().name}: {details}")


@dataclass(eq=False)
class _EtcdWatch:
    stream: _WatchStream
    on_events: EventsCallback
    on_error: ErrorCallback
    watch_id: int = -1
    created: threading.Event = None  # type: ignore[assignment]
    create_error: Exception | None = None
    dead: bool = False

    def __post_init__(self) -> None:
        self.created = threading.Event()

    def cancel(self) -> None:
        self.stream.cancel(self)


class _WatchStream:
    """Every watch of a store multiplexed on one gRPC stream, read by one thread.

    Watch-create responses arrive in the order the requests were sent, which is how a
    new watch learns its id. When the stream breaks, every watch gets ``on_error`` once
    and the next ``add`` opens a new stream.
    """

    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._requests: queue.Queue[Any] | None = None
        self._pending: collections.deque[_EtcdWatch] = collections.deque()
        self._active: dict[int, _EtcdWatch] = {}
        self._closed = False

    def add(self, key: bytes, range_end: bytes, start_revision: int,
            on_events: EventsCallback, on_error: ErrorCallback) -> _EtcdWatch:
        watch = _EtcdWatch(self, on_events, on_error)
        create = etcdrpc.WatchCreateRequest(key=key, range_end=range_end, start_revision=start_revision)
        with self._lock:
            if self._closed:
                raise StoreUnavailableError("etcd store is closed")
            if self._requests is None:
                self._open_locked()
            self.store.requests.add("watch_create")
            self._pending.append(watch)
            assert self._requests is not None
            self._requests.put(etcdrpc.WatchRequest(create_request=create))
        # Under load (a thousand watches opened at once) confirmations queue up: wait as long
        # as a retried request would.
        if not watch.created.wait(max(self.store.retry_for, self.store.request_timeout)):
            self._drop(watch)
            raise StoreUnavailableError(f"etcd did not confirm a watch on {key.decode()!r} in time")
        if watch.create_error is not None:
            raise watch.create_error
        return watch

    def cancel(self, watch: _EtcdWatch) -> None:
        with self._lock:
            if watch.dead:
                return
            watch.dead = True
            if self._active.pop(watch.watch_id, None) is not None and self._requests is not None:
                self.store.requests.add("watch_cancel")
                self._requests.put(etcdrpc.WatchRequest(
                    cancel_request=etcdrpc.WatchCancelRequest(watch_id=watch.watch_id)))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._requests is not None:
                self._requests.put(None)
            self._requests = None

    def _drop(self, watch: _EtcdWatch) -> None:
        with self._lock:
            watch.dead = True

    def _open_locked(self) -> None:
        requests: queue.Queue[Any] = queue.Queue()
        self._requests = requests
        _kv, _lease, watch_stub = self.store._current()
        responses = watch_stub.Watch(iter(requests.get, None))
        threading.Thread(target=self._read, args=(requests, responses), daemon=True,
                         name="etcd-watch").start()

    def _read(self, requests: queue.Queue[Any], responses: Iterator[Any]) -> None:
        error: Exception | None = None
        try:
            for resp in responses:
                self._handle(resp)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self._closed:
                return
            error = StoreUnavailableError(f"etcd watch stream lost: {exc.code().name}: {exc.details()}")
        except Exception as exc:  # noqa: BLE001 - the stream thread must never die silently
            error = StoreUnavailableError(f"etcd watch stream failed: {exc!r}")
        with self._lock:
            if self._requests is requests:
                self._requests = None
                requests.put(None)
            victims = list(self._pending) + list(self._active.values())
            self._pending.clear()
            self._active.clear()
        if error is not None:
            self.store._fail_over()
        err = error or StoreUnavailableError("etcd watch stream ended")
        for watch in victims:
            if not watch.created.is_set():
                watch.create_error = err
                watch.created.set()
            elif not watch.dead:
                watch.dead = True
                watch.on_error(err)

    def _handle(self, resp: Any) -> None:
        if resp.created:
            with self._lock:
                watch = self._pending.popleft() if self._pending else None
                if watch is None:
                    return
                watch.watch_id = resp.watch_id
                if resp.canceled:
                    watch.create_error = StoreUnavailableError(
                        f"etcd refused the watch: {resp.cancel_reason or 'compacted'}")
                elif watch.dead:
                    self.store.requests.add("watch_cancel")
                    assert self._requests is not None
                    self._requests.put(etcdrpc.WatchRequest(
                        cancel_request=etcdrpc.WatchCancelRequest(watch_id=resp.watch_id)))
                else:
                    self._active[resp.watch_id] = watch
            watch.created.set()
            if not resp.events:
                return
        with self._lock:
            watch = self._active.get(resp.watch_id)
            if watch is not None and resp.canceled:
                self._active.pop(resp.watch_id, None)
        if watch is None or watch.dead:
            return
        if resp.canceled:
            watch.dead = True
            reason = resp.cancel_reason or f"compacted at revision {resp.compact_revision}"
            watch.on_error(StoreUnavailableError(f"etcd cancelled a watch: {reason}"))
            return
        if resp.events:
            watch.on_events([
                Event(DELETE if ev.type == kv_pb2.Event.DELETE else PUT, ev.kv.key.decode(),
                      bytes(ev.kv.value), ev.kv.create_revision, ev.kv.mod_revision)
                for ev in resp.events
            ])


class _KeepAliveStream:
    """Lease refreshes multiplexed on one LeaseKeepAlive stream; answers match by lease id."""

    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._requests: queue.Queue[Any] | None = None
        self._waiting: dict[int, list[tuple[threading.Event, list[int]]]] = {}

    def refresh(self, lease: int, timeout: float) -> int:
        done = threading.Event()
        answer: list[int] = []
        with self._lock:
            if self._requests is None:
                try:
                    self._open_locked()
                except grpc.RpcError as exc:
                    raise StoreUnavailableError(f"etcd keep-alive stream: {exc.code().name}") from exc
                except StoreUnavailableError:
                    raise
            self._waiting.setdefault(lease, []).append((done, answer))
            assert self._requests is not None
            self._requests.put(etcdrpc.LeaseKeepAliveRequest(ID=lease))
        if not done.wait(timeout):
            with self._lock:
                waiters = self._waiting.get(lease, [])
                if (done, answer) in waiters:
                    waiters.remove((done, answer))
            raise StoreUnavailableError(f"etcd did not answer a keep-alive of lease {lease:x} in {timeout}s")
        if not answer:
            raise StoreUnavailableError(f"etcd keep-alive stream lost while refreshing lease {lease:x}")
        return answer[0]

    def close(self) -> None:
        with self._lock:
            if self._requests is not None:
                self._requests.put(None)
            self._requests = None

    def _open_locked(self) -> None:
        requests: queue.Queue[Any] = queue.Queue()
        _kv, lease_stub, _w = self.store._current()
        responses = lease_stub.LeaseKeepAlive(iter(requests.get, None))
        self._requests = requests
        threading.Thread(target=self._read, args=(requests, responses), daemon=True,
                         name="etcd-keepalive").start()

    def _read(self, requests: queue.Queue[Any], responses: Iterator[Any]) -> None:
        failed = False
        try:
            for resp in responses:
                with self._lock:
                    waiters = self._waiting.pop(resp.ID, [])
                for done, answer in waiters:
                    answer.append(resp.TTL)
                    done.set()
        except grpc.RpcError:
            failed = True
        except Exception:  # noqa: BLE001 - never die silently; waiters get an error below
            failed = True
        with self._lock:
            if self._requests is requests:
                self._requests = None
                requests.put(None)
            waiting, self._waiting = self._waiting, {}
        if failed:
            self.store._fail_over()
        for waiters in waiting.values():
            for done, _answer in waiters:
                done.set()  # no answer: the caller reports the stream as lost
