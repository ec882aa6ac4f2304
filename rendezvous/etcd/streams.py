"""An etcd store's connection: one gRPC channel, and two long-lived streams on it.

The channel goes to one endpoint at a time and moves to the next when a request or stream
finds it unavailable. Every watch of a store shares one Watch stream and every lease refresh
one LeaseKeepAlive stream, each read by a thread of its own: opening a stream per watch or
per refresh costs etcd more than the request itself. A broken stream fails whoever waits on
it, fails the channel over, and is opened again on the next use. Part of the etcd adapter:
with :mod:`rendezvous.etcd.store` and :mod:`rendezvous.etcd.auth`, the only modules that
use grpc (imported quietly, from :mod:`rendezvous.etcd.rpc`).
"""

from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

from rendezvous.errors import StoreUnavailableError
from rendezvous.etcd.rpc import etcdrpc, grpc
from rendezvous.net import Endpoint
from rendezvous.store import DELETE, PUT, ErrorCallback, Event, EventsCallback, RequestCounter

# Verified against etcd 3.5 with grpcio 1.85: a hung server or cut link is noticed in ~6.6 s.
# keepalive_time below 5 s makes etcd (--grpc-keepalive-min-time) drop the stream.
GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.ping_timeout_ms", 2000),
]


class Stubs(NamedTuple):
    kv: Any
    lease: Any
    watch: Any


def insecure_channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=GRPC_OPTIONS)


class EtcdChannel:
    """A gRPC channel to the current endpoint, opened on first use by ``open_channel``
    (plaintext, or TLS and auth: :class:`rendezvous.etcd.auth.Connector`)."""

    def __init__(self, endpoints: tuple[Endpoint, ...],
                 open_channel: Callable[[str], grpc.Channel] = insecure_channel) -> None:
        self.endpoints = endpoints
        self._open = open_channel
        self._lock = threading.Lock()
        self._index = 0
        self._channel: grpc.Channel | None = None
        self._stubs: Stubs | None = None
        self._closed = False

    @property
    def endpoint(self) -> str:
        return str(self.endpoints[self._index])

    def stubs(self) -> Stubs:
        with self._lock:
            if self._closed:
                raise StoreUnavailableError("etcd store is closed")
            if self._stubs is None:
                self._channel = self._open(self.endpoint)
                self._stubs = Stubs(etcdrpc.KVStub(self._channel), etcdrpc.LeaseStub(self._channel),
                                    etcdrpc.WatchStub(self._channel))
            return self._stubs

    def fail_over(self) -> None:
        """Drop the channel and move to the next endpoint (the same one when there is one)."""
        with self._lock:
            self._drop_locked()
            self._index = (self._index + 1) % len(self.endpoints)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_locked()

    def _drop_locked(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stubs = None


class WatchDeniedError(StoreUnavailableError):
    """etcd refused to create a watch as not permitted: a real refusal, or a stale auth token
    (etcd 3.5 says "permission denied" for both)."""


def _watch_refused(reason: str) -> StoreUnavailableError:
    if "permission denied" in reason or "invalid auth token" in reason:
        return WatchDeniedError(f"etcd refused the watch: {reason}")
    return StoreUnavailableError(f"etcd refused the watch: {reason or 'compacted'}")


@dataclass(eq=False)
class EtcdWatch:
    stream: WatchStream
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


class WatchStream:
    """Every watch of a store multiplexed on one gRPC stream, read by one thread.

    Watch-create responses arrive in the order the requests were sent, which is how a
    new watch learns its id. When the stream breaks, every watch gets ``on_error`` once
    and the next ``add`` opens a new stream.
    """

    def __init__(self, stub: Callable[[], Any], fail_over: Callable[[], None], counter: RequestCounter,
                 confirm_timeout: float) -> None:
        self._stub = stub  # the current channel's Watch stub
        self._fail_over = fail_over
        self._counter = counter
        self._confirm_timeout = confirm_timeout  # for etcd to confirm a new watch
        self._lock = threading.Lock()
        self._requests: queue.Queue[Any] | None = None
        self._pending: collections.deque[EtcdWatch] = collections.deque()
        self._active: dict[int, EtcdWatch] = {}
        self._call: Any = None  # the current gRPC stream, to cancel
        self._closed = False

    def add(self, key: bytes, range_end: bytes, start_revision: int,
            on_events: EventsCallback, on_error: ErrorCallback) -> EtcdWatch:
        watch = EtcdWatch(self, on_events, on_error)
        create = etcdrpc.WatchCreateRequest(key=key, range_end=range_end, start_revision=start_revision)
        with self._lock:
            if self._closed:
                raise StoreUnavailableError("etcd store is closed")
            if self._requests is None:
                try:
                    self._open_locked()
                except ValueError as exc:  # another thread failed over and closed the channel under us
                    raise StoreUnavailableError(f"etcd watch stream: {exc}") from exc
            self._counter.add("watch_create")
            self._pending.append(watch)
            assert self._requests is not None
            self._requests.put(etcdrpc.WatchRequest(create_request=create))
        if not watch.created.wait(self._confirm_timeout):
            self._drop(watch)
            raise StoreUnavailableError(f"etcd did not confirm a watch on {key.decode()!r} in time")
        if watch.create_error is not None:
            raise watch.create_error
        return watch

    def cancel(self, watch: EtcdWatch) -> None:
        with self._lock:
            if watch.dead:
                return
            watch.dead = True
            if self._active.pop(watch.watch_id, None) is not None and self._requests is not None:
                self._counter.add("watch_cancel")
                self._requests.put(etcdrpc.WatchRequest(
                    cancel_request=etcdrpc.WatchCancelRequest(watch_id=watch.watch_id)))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._requests is not None:
                self._requests.put(None)
            self._requests = None

    def _drop(self, watch: EtcdWatch) -> None:
        with self._lock:
            watch.dead = True

    def abandon(self, why: str) -> None:
        """End the stream now, as a broken one ends: each of its watches gets ``on_error``
        (their owners watch again, on the store's next stream)."""
        with self._lock:
            self._closed = True
            call, self._call = self._call, None
            if self._requests is not None:
                self._requests.put(None)
            self._requests = None
            victims = list(self._pending) + list(self._active.values())
            self._pending.clear()
            self._active.clear()
        if call is not None:
            call.cancel()  # etcd keeps a half-closed watch stream open: cancel it
        _fail(victims, StoreUnavailableError(f"etcd watch stream ended: {why}"))

    def _open_locked(self) -> None:
        requests: queue.Queue[Any] = queue.Queue()
        self._requests = requests
        responses = self._stub().Watch(iter(requests.get, None))
        self._call = responses
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
            self._fail_over()
        _fail(victims, error or StoreUnavailableError("etcd watch stream ended"))

    def _handle(self, resp: Any) -> None:
        if resp.created:
            with self._lock:
                watch = self._pending.popleft() if self._pending else None
                if watch is None:
                    return
                watch.watch_id = resp.watch_id
                if resp.canceled:
                    watch.create_error = _watch_refused(resp.cancel_reason)
                elif watch.dead:
                    self._counter.add("watch_cancel")
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
                Event(DELETE if ev.type == etcdrpc.kv_pb2.Event.DELETE else PUT, ev.kv.key.decode(),
                      bytes(ev.kv.value), ev.kv.create_revision, ev.kv.mod_revision)
                for ev in resp.events
            ])


def _fail(victims: list[EtcdWatch], err: StoreUnavailableError) -> None:
    for watch in victims:
        if not watch.created.is_set():
            watch.create_error = err
            watch.created.set()
        elif not watch.dead:
            watch.dead = True
            watch.on_error(err)


class KeepAliveStream:
    """Lease refreshes multiplexed on one LeaseKeepAlive stream; answers match by lease id."""

    def __init__(self, stub: Callable[[], Any], fail_over: Callable[[], None]) -> None:
        self._stub = stub  # the current channel's Lease stub
        self._fail_over = fail_over
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
                except ValueError as exc:  # another thread failed over and closed the channel under us
                    raise StoreUnavailableError(f"etcd keep-alive stream: {exc}") from exc
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
        responses = self._stub().LeaseKeepAlive(iter(requests.get, None))
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
            self._fail_over()
        for waiters in waiting.values():
            for done, _answer in waiters:
                done.set()  # no answer: the caller reports the stream as lost
