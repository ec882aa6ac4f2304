"""Test certificates made with the ``openssl`` command: a CA, etcd's server certificate,
client certificates (the CN is the etcd user name when etcd runs with ``--client-cert-auth``),
and the broken ones the error tests need (another CA, an expired certificate). And the
commands of docs/security.md, run exactly as written (:func:`run_docs_block`).

EC P-256 keys: each certificate costs a few milliseconds. Everything lives in one directory
the caller owns (:func:`pki` removes it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rendezvous.etcd.server import EtcdServer, ServerTls, etcd_binary

SECURITY_DOC = Path(__file__).resolve().parents[1] / "docs" / "security.md"

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path

    def pem(self) -> tuple[bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes()


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path  # what etcd and the agents trust
    ca_key: Path

    def issue(self, name: str, cn: str | None = None, *, days: int = 2, server: bool = False,
              ca: tuple[Path, Path] | None = None) -> Pair:
        """A certificate signed by this CA (or ``ca``: (cert, key)); ``days=-1`` is expired.
        A server certificate is valid for 127.0.0.1 and localhost, as server and as client
        (etcd members use theirs for both)."""
        cert, key, csr = (self.dir / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
        ext = self.dir / f"{name}.ext"
        usage = "serverAuth,clientAuth" if server else "clientAuth"
        ext.write_text(f"extendedKeyUsage={usage}\n" + ("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                                       if server else ""))
        _openssl("req", *_EC, "-keyout", key, "-out", csr, "-subj", f"/CN={cn or name}")
        ca_cert, ca_key = ca or (self.ca, self.ca_key)
        _openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
                 "-out", cert, "-days", str(days), "-extfile", ext)
        return Pair(cert, key)


def make_ca(directory: Path, name: str = "ca") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", *_EC, "-keyout", key, "-out", cert, "-subj", f"/CN=elastic-agent test {name}",
             "-days", "2")
    return Pki(directory, cert, key)


@contextmanager
def pki() -> Iterator[Pki]:
    """A fresh CA in a temporary directory, removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="elastic-agent-pki-"))
    try:
        yield make_ca(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def server_tls(pki: Pki, server: Pair, client_cert_auth: bool = True) -> ServerTls:
    return ServerTls(str(pki.ca), str(server.cert), str(server.key), client_cert_auth)


def docs_block(name: str) -> str:
    """The shell block right after ``<!-- tested: NAME -->`` in docs/security.md."""
    found = re.search(rf"<!-- tested: {re.escape(name)} -->\n```sh\n(.*?)```", SECURITY_DOC.read_text(), re.S)
    assert found, f"docs/security.md has no block marked 'tested: {name}'"
    return found.group(1)


def run_docs_block(name: str, server: EtcdServer, ca: Path, admin: Pair, cwd: Path) -> str:
    """Run a block of docs/security.md exactly as written."""
    return run_as_admin(docs_block(name), server, ca, admin, cwd)


def run_as_admin(script: str, server: EtcdServer, ca: Path, admin: Pair, cwd: Path) -> str:
    """A shell script as the docs run it: ``etcdctl`` on the PATH, ``ETCDCTL_*`` pointing at
    ``server`` with the administrator's certificate (CN=root)."""
    env = {**os.environ, "PATH": f"{etcd_binary().parent}{os.pathsep}{os.environ['PATH']}",
           "ETCDCTL_ENDPOINTS": server.url, "ETCDCTL_CACERT": str(ca),
           "ETCDCTL_CERT": str(admin.cert), "ETCDCTL_KEY": str(admin.key)}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{script!r} failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


def lock_down(server: EtcdServer, pki: Pki, admin: Pair, password: str, cwd: Path) -> None:
    """docs/security.md, section 2, on ``server``: root, the job llama-ft's role and user (with
    ``password``), authentication on, and the certificate-only job nightly-eval."""
    secret = cwd / "llama-ft.password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    for block in ("root", "job", "enable", "job-by-certificate"):
        run_docs_block(block, server, pki.ca, admin, cwd)


def key_material(pair: Pair) -> list[str]:
    """Lines of the private key's base64 body: what must never appear in a log or record."""
    return [line for line in pair.key.read_text().splitlines() if line and not line.startswith("-----")]


def _openssl(*args: object) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()}")
