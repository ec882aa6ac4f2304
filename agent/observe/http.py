"""The metrics port: ``/metrics`` (Prometheus), ``/livez`` and ``/readyz``. Cheap handlers
that read a few fields; never block on etcd or the workers."""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


class HealthServer:
    """``live()`` answers whether the agent's loop is responsive; ``ready()`` whether this node
    runs workers of the current round."""

    def __init__(self, addr: str, port: int, registry: CollectorRegistry,
                 live: Callable[[], tuple[bool, str]], ready: Callable[[], tuple[bool, str]]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(outer.registry), CONTENT_TYPE_LATEST)
                elif path in ("/livez", "/readyz"):
                    ok, why = (outer.live if path == "/livez" else outer.ready)()
                    self._send(200 if ok else 503, (why + "\n").encode(), "text/plain; charset=utf-8")
                else:
                    self._send(404, b"not found: try /metrics, /livez or /readyz\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:
                pass

        self.registry = registry
        self.live = live
        self.ready = ready
        self.server = ThreadingHTTPServer((addr, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="metrics-http")

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def loop_liveness(heartbeat: Callable[[], float], limit: float) -> Callable[[], tuple[bool, str]]:
    """Live while the loop's last heartbeat (monotonic) is recent."""

    def live() -> tuple[bool, str]:
        age = time.monotonic() - heartbeat()
        if age <= limit:
            return True, f"ok: agent loop answered {age:.1f}s ago"
        return False, f"agent loop unresponsive for {age:.1f}s (limit {limit:.0f}s)"

    return live
