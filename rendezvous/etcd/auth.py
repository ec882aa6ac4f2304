"""Who the etcd adapter is to etcd: the channel's TLS, a user's auth token on every request,
and what etcd's refusals mean, in one line naming what to fix.

Verified against etcd 3.5.1 with grpcio 1.85 (tests/integration/test_etcd_auth.py):
- a wrong password (or unknown user) is INVALID_ARGUMENT "authentication failed, invalid user
  ID or password"; a user given to an etcd without auth, FAILED_PRECONDITION "authentication is
  not enabled"; a key outside the user's roles, PERMISSION_DENIED "permission denied";
- an expired simple token (``--auth-token-ttl`` after its last use), or any token after an etcd
  restart (simple tokens live in its memory), is UNAUTHENTICATED "invalid auth token": we
  authenticate again and retry the request once, as etcd's Go client does;
- a watch created with such a token is cancelled "permission denied", exactly like a real
  refusal (see :class:`Watches`); keep-alives are not checked.
A TLS handshake failure is UNAVAILABLE, like an etcd that is down: see :mod:`rendezvous.etcd.tls`.

Part of the etcd adapter: with etcd_store and etcd_streams, the only modules that use grpc.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rendezvous.errors import StoreConfigError, StoreUnavailableError
from rendezvous.etcd import tls as etcd_tls
from rendezvous.etcd.rpc import etcdrpc, grpc
from rendezvous.etcd.streams import GRPC_OPTIONS, EtcdWatch, WatchDeniedError, WatchStream
from rendezvous.net import parse_endpoint
from rendezvous.store import ErrorCallback, EventsCallback

PASSWORD_SOURCES = "ELASTIC_AGENT_ETCD_PASSWORD or --etcd-password-file"
HOW_TO = "see docs/security.md"


@dataclass(frozen=True)
class Credentials:
    """How to reach etcd: TLS (a CA, a client certificate) and/or a user with a password.
    Paths, not contents; the password never shows in ``repr``."""

    tls: bool = False  # also implied by a CA, a client certificate or key
    cacert: str | None = None  # --etcd-cacert; default: the system's CAs
    cert: str | None = None  # --etcd-cert, with --etcd-key
    key: str | None = None
    user: str | None = None  # --etcd-user; without one, etcd may take the certificate's CN
    password: str | None = field(default=None, repr=False)
    scope: str = ""  # the key prefix these credentials must reach, named in permission errors

    @property
    def uses_tls(self) -> bool:
        return self.tls or bool(self.cacert or self.cert or self.key)


class Connector:
    """Opens one store's channels with its credentials, and explains etcd's refusals."""

    def __init__(self, credentials: Credentials, timeout: float, https: bool = False) -> None:
        self.credentials = credentials
        self.timeout = timeout
        self._files = (etcd_tls.load(credentials.cacert, credentials.cert, credentials.key)
                       if https or credentials.uses_tls else None)
        self._token = _Token(credentials, timeout) if credentials.user else None

    def open(self, target: str) -> grpc.Channel:
        if self._files is None:
            channel = grpc.insecure_channel(target, options=GRPC_OPTIONS)
        else:
            f = self._files
            tls = grpc.ssl_channel_credentials(f.ca_pem, f.key_pem, f.cert_pem)
            channel = grpc.secure_channel(target, tls, options=GRPC_OPTIONS)
        if self._token is None:
            return channel
        return grpc.intercept_channel(channel, _WithToken(self._token, etcdrpc.AuthStub(channel)))

    def forget_token(self) -> bool:
        """Drop our token so the next stream gets a fresh one; False when we have none (a
        refusal then stands)."""
        if self._token is None:
            return False
        self._token.forget()
        return True

    def refusal(self, kind: str, exc: grpc.RpcError, endpoint: str) -> StoreConfigError | None:
        """The error to raise at once for a refusal that retrying cannot fix; None otherwise."""
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            problem = etcd_tls.handshake_problem(self._files, parse_endpoint(endpoint), details, self.timeout)
            return StoreConfigError(problem) if problem else None
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return self.denied(kind)
        if "user name is empty" in details:
            return StoreConfigError(
                f"etcd at {endpoint} requires authentication: give --etcd-user with a password "
                f"({PASSWORD_SOURCES}), or a client certificate whose CN is an etcd user ({HOW_TO})")
        return None

    def denied(self, kind: str) -> StoreConfigError:
        c = self.credentials
        who = (f"etcd user {c.user!r}" if c.user else
               "the etcd user named by the client certificate's CN" if c.cert else "this client")
        return StoreConfigError(
            f"{who} has no permission on {c.scope or 'the keys it uses'} (etcd refused a {kind}): "
            f"grant it a role with readwrite on that key prefix ({HOW_TO})")


class Watches:
    """A store's watch stream, replaced when etcd refuses a watch on it.

    A stream's auth token is fixed when it opens, so a watch refused "permission denied" may
    only mean the token went stale: ``renew()`` drops it (False: there is none, the refusal
    stands) and the watch is tried once more on a new stream, which signs in afresh. The
    refusing stream is closed either way: etcd 3.5 answers a refused watch with watch id 0
    and from then on drops the events of the stream's own watch 0. Its watches get
    ``on_error``, as when a stream breaks, and their owners watch again."""

    def __init__(self, open_stream: Callable[[], WatchStream]) -> None:
        self._open = open_stream
        self._lock = threading.Lock()
        self._stream = open_stream()

    def add(self, key: bytes, range_end: bytes, start_revision: int, on_events: EventsCallback,
            on_error: ErrorCallback, renew: Callable[[], bool]) -> EtcdWatch:
        with self._lock:
            stream = self._stream
        try:
            return stream.add(key, range_end, start_revision, on_events, on_error)
        except WatchDeniedError:
            with self._lock:
                if self._stream is stream:  # no other thread replaced it meanwhile
                    stream.abandon("etcd refused a watch on it")
                    self._stream = self._open()
                stream = self._stream
            if not renew():
                raise
        return stream.add(key, range_end, start_revision, on_events, on_error)

    def close(self) -> None:
        with self._lock:
            self._stream.close()


class _Token:
    """A user's auth token: fetched on first use, again when etcd no longer knows it."""

    def __init__(self, credentials: Credentials, timeout: float) -> None:
        self._user = credentials.user or ""
        self._password = credentials.password or ""
        self._timeout = timeout
        self._lock = threading.Lock()
        self._value: str | None = None

    def get(self, stub: Any) -> str:
        with self._lock:  # one login at a time: the others wait for its token
            if self._value is None:
                self._value = self._authenticate(stub)
            return self._value

    def renew(self, stale: str, stub: Any) -> str:
        with self._lock:
            if self._value == stale:  # nobody renewed it meanwhile
                self._value = None
        return self.get(stub)

    def forget(self) -> None:
        with self._lock:
            self._value = None

    def _authenticate(self, stub: Any) -> str:
        request = etcdrpc.AuthenticateRequest(name=self._user, password=self._password)
        try:
            return stub.Authenticate(request, timeout=self._timeout).token
        except grpc.RpcError as exc:
            details = exc.details() or ""
            if "authentication failed" in details:
                raise StoreConfigError(
                    f"etcd user {self._user!r}: authentication failed (wrong password, or no such "
                    f"user): check --etcd-user and the password in {PASSWORD_SOURCES}") from None
            if "authentication is not enabled" in details:
                raise StoreConfigError(
                    f"--etcd-user ({self._user}) was given but etcd has authentication disabled, "
                    f"so anyone may write the job's keys: enable it ({HOW_TO}) or drop --etcd-user") from None
            raise  # unavailable and the like: the request's own retry policy applies


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                   "wait_for_ready", "compression")),
               grpc.ClientCallDetails):
    """A call's details with our token in its metadata."""


def _with_token(details: grpc.ClientCallDetails, token: str) -> _Details:
    metadata = [(k, v) for k, v in (details.metadata or ()) if k != "token"] + [("token", token)]
    return _Details(details.method, details.timeout, metadata, details.credentials,
                    details.wait_for_ready, details.compression)


def _stale(outcome: Any) -> bool:
    details = outcome.details() or ""
    return (outcome.code() == grpc.StatusCode.UNAUTHENTICATED and "invalid auth token" in details) \
        or "revision of auth store is old" in details


class _WithToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Every request carries the token; a request refused for a stale one is retried once."""

    def __init__(self, token: _Token, stub: Any) -> None:
        self._token = token
        self._stub = stub  # Authenticate, on the channel without this interceptor

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        token = self._token.get(self._stub)
        outcome = continuation(_with_token(details, token), request)
        if _stale(outcome):
            outcome = continuation(_with_token(details, self._token.renew(token, self._stub)), request)
        return outcome

    def intercept_stream_stream(self, continuation: Any, details: grpc.ClientCallDetails,
                                request_iterator: Any) -> Any:
        try:
            token = self._token.get(self._stub)
        except grpc.RpcError as exc:  # stream callers expect our errors, not grpc's
            raise StoreUnavailableError(f"etcd authentication: {exc.code().name}: {exc.details()}") from exc
        return continuation(_with_token(details, token), request_iterator)
