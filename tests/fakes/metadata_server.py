"""A fake cloud instance-metadata service on 127.0.0.1: AWS IMDSv2, GCP and Azure Scheduled
Events, all on one port, so that preemption code can be tested without a cloud.

In-process::

    with MetadataServer() as server:          # or MetadataServer(clouds=("gcp",))
        os.environ["ELASTIC_AGENT_METADATA_URL"] = server.url
        server.preempt("aws", in_seconds=30)
        server.wait_for_request(lambda r: r.path.endswith("/spot/instance-action"), timeout=5)

As a separate process: ``python -m tests.fakes.metadata_server --port 0`` prints the port on
one line and serves until SIGTERM/SIGINT. Its control endpoints (POST, loopback only) do what
the methods do: ``/_fake/preempt?cloud=aws&in_seconds=30``, ``/_fake/clear[?cloud=aws]``,
``/_fake/revoke_tokens``; GET ``/_fake/requests`` returns the request log as JSON.

What is emulated, as the clouds document it:
- AWS: ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds`` (1..21600)
  gives a token; every ``GET /latest/...`` without a valid token is 401 (IMDSv2 required).
  ``/latest/meta-data/spot/instance-action`` is 404 until armed, then
  ``{"action": ..., "time": "YYYY-MM-DDTHH:MM:SSZ"}``.
- GCP: ``/computeMetadata/v1/instance/preempted`` needs ``Metadata-Flavor: Google`` (else 403),
  answers ``FALSE``/``TRUE`` with the ``Metadata-Flavor: Google`` response header.
- Azure: ``/metadata/scheduledevents?api-version=...`` and
  ``/metadata/instance/compute/name?api-version=...&format=text`` need ``Metadata: true`` (else
  400) and an ``api-version``. A Preempt event names ``vm_name`` in ``Resources`` unless told
  otherwise; ``DocumentIncarnation`` goes up with every change.
A cloud not in ``clouds`` answers 404 everywhere, like another cloud's metadata service.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import secrets
import signal
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CLOUDS = ("aws", "gcp", "azure")
AWS_MAX_TTL_S = 21600


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # with the query string
    headers: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


class MetadataServer:
    def __init__(self, clouds: Iterable[str] = CLOUDS, *, host: str = "127.0.0.1", port: int = 0,
                 vm_name: str = "vm-under-test", wall: Callable[[], float] = time.time) -> None:
        self.clouds = tuple(clouds)
        unknown = set(self.clouds) - set(CLOUDS)
        if unknown:
            raise ValueError(f"clouds ({sorted(unknown)}) must be among {CLOUDS}")
        self.vm_name = vm_name
        self.wall = wall
        self._lock = threading.Condition()
        self._log: list[RecordedRequest] = []
        self._tokens: dict[str, float] = {}  # token -> wall-clock expiry
        self._aws_action: dict[str, str] | None = None
        self._gcp_preempted = False
        self._azure_events: list[dict[str, object]] = []
        self._azure_incarnation = 1
        self._overrides: dict[str, tuple[int, bytes]] = {}
        self.server = ThreadingHTTPServer((host, port), _handler_for(self))
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        # A short poll interval only so that stop() (shutdown) returns quickly.
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="fake-metadata")

    # ---- lifecycle ----
    def start(self) -> MetadataServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> MetadataServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- arming notices ----
    def preempt(self, cloud: str, in_seconds: float = 30.0, *, action: str = "terminate",
                resources: list[str] | None = None) -> None:
        """Arm a notice: termination ``in_seconds`` from now (GCP has no time in its answer)."""
        when = self.wall() + in_seconds
        with self._lock:
            if cloud == "aws":
                stamp = datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                self._aws_action = {"action": action, "time": stamp}
            elif cloud == "gcp":
                self._gcp_preempted = True
            elif cloud == "azure":
                self._azure_events.append({
                    "EventId": str(uuid.uuid4()).upper(), "EventStatus": "Scheduled",
                    "EventType": "Preempt", "ResourceType": "VirtualMachine",
                    "Resources": [self.vm_name] if resources is None else list(resources),
                    "NotBefore": email.utils.formatdate(when, usegmt=True),
                    "Description": "", "EventSource": "Platform", "DurationInSeconds": -1,
                })
                self._azure_incarnation += 1
            else:
                raise ValueError(f"cloud ({cloud!r}) must be one of {CLOUDS}")

    def clear(self, cloud: str | None = None) -> None:
        """Withdraw armed notices (of one cloud, or all) and any overrides."""
        with self._lock:
            if cloud in (None, "aws"):
                self._aws_action = None
            if cloud in (None, "gcp"):
                self._gcp_preempted = False
            if cloud in (None, "azure") and self._azure_events:
                self._azure_events = []
                self._azure_incarnation += 1
            if cloud is None:
                self._overrides.clear()

    def revoke_tokens(self) -> None:
        """Invalidate every AWS token handed out so far (as if they had expired)."""
        with self._lock:
            self._tokens.clear()

    def override(self, path: str, status: int, body: bytes) -> None:
        """Answer ``path`` (without the query) with this status and body, whatever the cloud."""
        with self._lock:
            self._overrides[path] = (status, body)

    # ---- the request log ----
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._log)

    def wait_for_request(self, predicate: Callable[[RecordedRequest], bool], timeout: float) -> RecordedRequest:
        """The first logged request that matches, waiting at most ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = next((r for r in self._log if predicate(r)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching request within {timeout}s; saw {[r.path for r in self._log]}")
                self._lock.wait(left)

    # ---- the emulation: (method, path, headers) -> (status, headers, body) ----
    def answer(self, method: str, target: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query)
        if path.startswith("/_fake/"):
            return self._control(method, path, query)
        request = RecordedRequest(method, target, headers)
        with self._lock:
            self._log.append(request)
            self._lock.notify_all()
            if path in self._overrides:
                status, body = self._overrides[path]
                return status, {"Content-Type": "text/plain"}, body
            if path.startswith("/latest/") and "aws" in self.clouds:
                return self._aws(method, path, request)
            if path.startswith("/computeMetadata/") and "gcp" in self.clouds:
                return self._gcp(method, path, request)
            if path.startswith("/metadata/") and "azure" in self.clouds:
                return self._azure(method, path, query, request)
        return 404, {"Content-Type": "text/plain"}, b"Not Found\n"

    def _aws(self, method: str, path: str, request: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        text = {"Content-Type": "text/plain"}
        if path == "/latest/api/token":
            if method != "PUT":
                return 405, text, b"Method Not Allowed\n"
            ttl = request.header("X-aws-ec2-metadata-token-ttl-seconds")
            if ttl is None or not ttl.isdigit() or not 1 <= int(ttl) <= AWS_MAX_TTL_S:
                return 400, text, b"Bad Request\n"
            token = secrets.token_urlsafe(32)
            self._tokens[token] = self.wall() + int(ttl)
            return 200, {**text, "X-aws-ec2-metadata-token-ttl-seconds": ttl}, token.encode()
        token = request.header("X-aws-ec2-metadata-token")
        if token is None or self._tokens.get(token, 0.0) <= self.wall():
            return 401, text, b"Unauthorized\n"
        if method != "GET":
            return 405, text, b"Method Not Allowed\n"
        if path == "/latest/meta-data/spot/instance-action" and self._aws_action is not None:
            return 200, {"Content-Type": "application/json"}, json.dumps(self._aws_action).encode()
        return 404, text, b"Not Found\n"

    def _gcp(self, method: str, path: str, request: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        flavor = {"Metadata-Flavor": "Google", "Content-Type": "application/text"}
        if request.header("Metadata-Flavor") != "Google":
            return 403, flavor, b"Missing Metadata-Flavor:Google header.\n"
        if method == "GET" and path == "/computeMetadata/v1/instance/preempted":
            return 200, flavor, b"TRUE" if self._gcp_preempted else b"FALSE"
        return 404, flavor, b"Not Found\n"

    def _azure(self, method: str, path: str, query: dict[str, list[str]],
               request: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        as_json = {"Content-Type": "application/json; charset=utf-8"}
        if request.header("Metadata") != "true":
            return 400, as_json, b'{"error": "Bad request. Required metadata header not specified"}'
        if "api-version" not in query:
            return 400, as_json, b'{"error": "Bad request. api-version was not specified in the request"}'
        if method == "GET" and path == "/metadata/scheduledevents":
            doc = {"DocumentIncarnation": self._azure_incarnation, "Events": self._azure_events}
            return 200, as_json, json.dumps(doc).encode()
        if method == "GET" and path == "/metadata/instance/compute/name":
            return 200, {"Content-Type": "text/plain; charset=utf-8"}, self.vm_name.encode()
        return 404, as_json, b'{"error": "Not found"}'

    def _control(self, method: str, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        as_json = {"Content-Type": "application/json"}
        one = {k: v[0] for k, v in query.items()}
        try:
            if method == "GET" and path == "/_fake/requests":
                log = [{"method": r.method, "path": r.path, "headers": r.headers} for r in self.requests()]
                return 200, as_json, json.dumps(log).encode()
            if method != "POST":
                return 405, as_json, b'{"error": "control endpoints take POST"}'
            if path == "/_fake/preempt":
                self.preempt(one["cloud"], float(one.get("in_seconds", 30.0)), action=one.get("action", "terminate"))
            elif path == "/_fake/clear":
                self.clear(one.get("cloud"))
            elif path == "/_fake/revoke_tokens":
                self.revoke_tokens()
            else:
                return 404, as_json, b'{"error": "unknown control endpoint"}'
        except (KeyError, ValueError) as exc:
            return 400, as_json, json.dumps({"error": str(exc)}).encode()
        return 200, as_json, b'{"ok": true}'


def _handler_for(fake: MetadataServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            status, headers, body = fake.answer(self.command, self.path, dict(self.headers.items()))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST = _serve  # noqa: N815 - http.server's naming

        def log_message(self, fmt: str, *args: object) -> None:
            pass

    return Handler


def remote(url: str, action: str, **params: object) -> bytes:
    """Drive a fake running in another process, e.g. ``remote(url, "preempt", cloud="gcp")``."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    method = "GET" if action == "requests" else "POST"
    request = urllib.request.Request(f"{url}/_fake/{action}" + (f"?{query}" if query else ""), method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=5.0) as reply:
        return reply.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--clouds", default=",".join(CLOUDS), help="comma-separated subset of aws,gcp,azure")
    parser.add_argument("--vm-name", default="vm-under-test")
    args = parser.parse_args(argv)
    # Block the stop signals before any thread starts (threads inherit the mask), then take
    # them synchronously: no handler, no polling.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    clouds = [c for c in args.clouds.split(",") if c]
    server = MetadataServer(clouds, port=args.port, vm_name=args.vm_name).start()
    print(server.port, flush=True)
    try:
        signal.sigwait(stop_signals)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
