"""The one module that talks to etcd.

We use only the generated gRPC stubs of the ``python3-etcd3`` distribution (``etcd3.etcdrpc``),
not its client class: its watch thread dies on a lost stream and it refuses a failed endpoint
for five minutes (see docs/architecture.md). This adapter owns endpoint failover, gRPC
keepalive (so a hung server or a cut link is noticed), bounded retries (tenacity), request
counting, and translating every client error into ours. Its watch and keep-alive streams
are in :mod:`rendezvous.etcd.streams`; TLS, users and what etcd's refusals mean, in
:mod:`rendezvous.etcd.auth` and :mod:`rendezvous.etcd.tls`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, TypeVar

import tenacity

from rendezvous.errors import LeaseLostError, RendezvousError, StoreFullError, StoreUnavailableError
from rendezvous.etcd.auth import Connector, Credentials, Watches
from rendezvous.etcd.rpc import etcdrpc, grpc
from rendezvous.etcd.streams import EtcdChannel, EtcdWatch, KeepAliveStream, WatchDeniedError, WatchStream
from rendezvous.net import Endpoint, endpoints_text, parse_endpoints, uses_tls
from rendezvous.store import KV, ErrorCallback, EventsCallback, RequestCounter, TxnResult

log = logging.getLogger(__name__)
T = TypeVar("T")

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def _range_end(prefix: bytes) -> bytes:
    raw = bytearray(prefix)
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return bytes(raw[: i + 1])
    return b"\0"


def _replaced(exc: grpc.RpcError) -> bool:
    """Cancelled because another thread failed over and closed the channel under this call."""
    return exc.code() is grpc.StatusCode.CANCELLED and "closed" in (exc.details() or "").lower()


def _dead(exc: grpc.RpcError, since_ok: float, timeout: float) -> bool:
    """Whether to drop the channel for the next endpoint. A slow reply while other requests
    succeed is load, not a dead member: dropping the channel would cancel every request and
    watch in flight on it, and their retries load etcd further (seen at 1,024 simulated nodes)."""
    if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        return since_ok > timeout
    return exc.code() is grpc.StatusCode.UNAVAILABLE


def _kv(kv: Any) -> KV:
    return KV(kv.key.decode(), bytes(kv.value), kv.create_revision, kv.mod_revision, kv.lease)


class EtcdStore:
    """A :class:`~rendezvous.store.Store` backed by an etcd v3 cluster. ``https://`` endpoints
    or TLS ``credentials`` make every connection TLS (never a fallback to plaintext).
    Each method is one request through :class:`_Requests` (retries, fail-over, errors)."""

    def __init__(self, endpoints: tuple[Endpoint, ...] | str, *, credentials: Credentials | None = None,
                 request_timeout: float = 2.0, retry_for: float = 5.0, counter: RequestCounter | None = None,
                 observer: Callable[[str, float, BaseException | None], None] | None = None) -> None:
        https = isinstance(endpoints, str) and uses_tls(endpoints)
        self.endpoints = (parse_endpoints(endpoints) if isinstance(endpoints, str)
                          else tuple(Endpoint(*e) for e in endpoints))  # (host, port) pairs too
        self.request_timeout = request_timeout
        self.retry_for = retry_for
        self.requests = counter or RequestCounter()
        self._connector = Connector(credentials or Credentials(), request_timeout, https)  # checks TLS files now
        self._channel = EtcdChannel(self.endpoints, self._connector.open)
        self._rpc = _Requests(self.endpoints, self._channel, self._connector, self.requests, observer,
                              request_timeout, retry_for)
        # Under load (a thousand watches opened at once) confirmations queue up: wait as long
        # as a retried request would.
        self._watches = Watches(lambda: WatchStream(lambda: self._channel.stubs().watch, self._channel.fail_over,
                                                    self.requests, confirm_timeout=max(retry_for, request_timeout)))
        self._keepalives = KeepAliveStream(lambda: self._channel.stubs().lease, self._channel.fail_over)

    # --- plumbing ----------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return self._channel.endpoint

    @property
    def observer(self) -> Callable[[str, float, BaseException | None], None] | None:
        """Told (request kind, seconds, error or None) after every attempt: the agent's metrics,
        set once the store is open (the metrics need the node id the store helps find)."""
        return self._rpc.observer

    @observer.setter
    def observer(self, observer: Callable[[str, float, BaseException | None], None] | None) -> None:
        self._rpc.observer = observer

    def _call(self, kind: str, fn: Callable[[Any, Any, Any], T], retry_for: float | None = None) -> T:
        return self._rpc.call(kind, fn, retry_for)

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
            self._rpc.observe("lease_keepalive", began, exc)
            raise
        self._rpc.observe("lease_keepalive", began, None)
        return float(ttl)

    def revoke(self, lease: int) -> None:
        req = etcdrpc.LeaseRevokeRequest(ID=lease)
        try:
            self._call("lease_revoke", lambda _k, stub, _w: stub.LeaseRevoke(req, timeout=self.request_timeout))
        except LeaseLostError:
            pass  # already gone: the goal of a revoke

    # --- watches ----------------------------------------------------------------------------
    def watch(self, key: str, on_events: EventsCallback, on_error: ErrorCallback,
              start_revision: int, prefix: bool = False) -> EtcdWatch:
        raw = key.encode()
        try:
            return self._watches.add(raw, _range_end(raw) if prefix else b"", start_revision, on_events, on_error,
                                     renew=self._connector.forget_token)
        except WatchDeniedError as exc:
            raise self._connector.denied("watch") from exc

    def close(self) -> None:
        self._watches.close()
        self._keepalives.close()
        self._channel.close()


class _Requests:
    """One etcd request as the store's methods make it: retried (bounded by ``retry_for``) while
    the cluster is unavailable, failed over off a member that stopped answering, refused at once
    for TLS, login or permission, out as one typed error; every attempt counted and observed.
    The policy lives apart from the store's methods, which only say what to ask."""

    def __init__(self, endpoints: tuple[Endpoint, ...], channel: EtcdChannel, connector: Connector,
                 counter: RequestCounter, observer: Callable[[str, float, BaseException | None], None] | None,
                 request_timeout: float, retry_for: float) -> None:
        self.endpoints, self._channel, self._connector = endpoints, channel, connector
        self.requests = counter
        self.observer = observer  # (request kind, seconds, error or None) after every attempt
        self.request_timeout, self.retry_for = request_timeout, retry_for
        self._last_ok = 0.0  # when a request last succeeded: is a slow reply load or a dead member?

    def call(self, kind: str, fn: Callable[[Any, Any, Any], T], retry_for: float | None = None) -> T:
        """Run one request with bounded retries on unavailability, translating errors."""
        retry_for = self.retry_for if retry_for is None else retry_for

        def attempt() -> T:
            self.requests.add(kind)
            began = time.monotonic()
            try:
                result = fn(*self._channel.stubs())
            except grpc.RpcError as exc:
                full = _out_of_space(kind, exc)
                self.observe(kind, began, full or exc)
                if full is not None:  # not retried here: the caller says so, loudly, and tries later
                    raise full from exc
                refused = self._connector.refusal(kind, exc, self._channel.endpoint)
                if refused is not None:  # TLS, login or permission: retrying cannot help
                    raise refused from exc
                if exc.code() in _RETRYABLE or _replaced(exc):
                    if _dead(exc, time.monotonic() - self._last_ok, self.request_timeout):
                        self._channel.fail_over()
                    raise _Retry(f"{kind} on {self._channel.endpoint}: {exc.code().name}: {exc.details()}") from exc
                raise _translate(kind, exc) from exc
            except ValueError as exc:  # another thread failed over and closed the channel under us
                if "closed" not in str(exc).lower():
                    raise
                self.observe(kind, began, exc)
                raise _Retry(f"{kind} on {self._channel.endpoint}: channel replaced while in flight") from exc
            self.observe(kind, began, None)
            self._last_ok = time.monotonic()
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
                f"etcd unreachable at {endpoints_text(self.endpoints)} "
                f"for {retry_for}s ({exc})"
            ) from exc

    def observe(self, kind: str, began: float, error: BaseException | None) -> None:
        if self.observer is not None:
            try:
                self.observer(kind, time.monotonic() - began, error)
            except Exception:  # noqa: BLE001 - metrics never break a request
                log.debug("request observer failed", exc_info=True)


class _Retry(Exception):
    pass


def _out_of_space(kind: str, exc: grpc.RpcError) -> StoreFullError | None:
    details = exc.details() or ""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED and "database space exceeded" not in details:
        return None
    return StoreFullError(
        f"etcd is out of space ({kind} refused: {details or exc.code().name}): it takes no writes until it is "
        "compacted, defragmented and its NOSPACE alarm disarmed (docs/operations.md, 'etcd is full')")


def _translate(kind: str, exc: grpc.RpcError) -> RendezvousError:
    details = exc.details() or ""
    if "lease not found" in details or "requested lease not found" in details:
        return LeaseLostError(f"{kind}: lease expired or was revoked")
    return StoreUnavailableError(f"etcd {kind} failed: {exc.code().name}: {details}")
