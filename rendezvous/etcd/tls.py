"""TLS files for the etcd client, checked before the first connection, and why a handshake
failed, in words that name the file to fix.

gRPC reports every failed handshake as UNAVAILABLE ("failed to connect to all addresses; last
error: ... Tls handshake failed (TSI_PROTOCOL_FAILURE): ..."), and with grpcio 1.85 its
details cannot tell "etcd refused our certificate" from "etcd's certificate does not name the
host we dialled" (both read ``SSLV3_ALERT_BAD_CERTIFICATE``), and a client and a server
that disagree on TLS at all read "Socket closed" or "Handshake read failed", as when a server
goes away. So :func:`handshake_problem` makes one connection of its own (Python's ``ssl``)
and reads the precise reason there; only after such a failure, so it costs nothing else.
Plain ``ssl``, no grpc: the adapter modules that use grpc use this one.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rendezvous.errors import StoreConfigError
from rendezvous.net import Endpoint

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
# Alerts a server sends when it refuses the client's certificate (missing, expired, untrusted).
_REFUSED_US = ("ALERT_BAD_CERTIFICATE", "CERTIFICATE_REQUIRED", "ALERT_CERTIFICATE_EXPIRED",
               "ALERT_UNKNOWN_CA", "ALERT_HANDSHAKE_FAILURE", "ALERT_CERTIFICATE_UNKNOWN")


@dataclass(frozen=True)
class TlsFiles:
    """The PEM contents behind --etcd-cacert, --etcd-cert and --etcd-key (``None``: not given).
    Never shown: ``repr`` names the paths only."""

    cacert: str | None
    cert: str | None
    key: str | None
    ca_pem: bytes | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None

    def __repr__(self) -> str:
        return f"TlsFiles(cacert={self.cacert!r}, cert={self.cert!r}, key={self.key!r})"


def load(cacert: str | None, cert: str | None, key: str | None, now: datetime | None = None) -> TlsFiles:
    """Read and check the files: readable, PEM, the key belongs to the certificate, and both
    certificates valid now. Raises :class:`StoreConfigError` naming the flag."""
    if bool(cert) != bool(key):
        given, missing = ("--etcd-cert", "--etcd-key") if cert else ("--etcd-key", "--etcd-cert")
        raise StoreConfigError(f"{given} ({cert or key}) needs {missing} too: give the client "
                               "certificate and its key together")
    now = now or datetime.now(timezone.utc)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cacert:
        _try(lambda: context.load_verify_locations(cafile=cacert), f"--etcd-cacert ({cacert})",
             "not a PEM CA certificate")
        _check_validity("--etcd-cacert", cacert, now)
    if cert and key:
        _try(lambda: context.load_cert_chain(cert, key, password=lambda: b""),
             f"--etcd-cert ({cert}) with --etcd-key ({key})",
             "the key must be the unencrypted PEM private key of that certificate")
        _check_validity("--etcd-cert", cert, now)
    return TlsFiles(cacert, cert, key, *(Path(p).read_bytes() if p else None for p in (cacert, cert, key)))


def _try(action: object, what: str, expected: str) -> None:
    try:
        action()  # type: ignore[operator]
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            raise StoreConfigError(f"{what}: cannot use it ({exc.reason or exc}): {expected}") from None
        raise StoreConfigError(f"{what}: cannot read: {exc.strerror or exc}") from None


def _check_validity(flag: str, path: str, now: datetime) -> None:
    problem = validity_problem(flag, path, now)
    if problem:
        raise StoreConfigError(problem)


def validity_problem(flag: str, path: str, now: datetime | None = None) -> str | None:
    """Why the first certificate in ``path`` is not valid at ``now``, or None."""
    now = now or datetime.now(timezone.utc)
    try:
        span = validity(Path(path).read_bytes())
    except OSError:
        return None
    if span is None:
        return None
    not_before, not_after = span
    if now > not_after:
        return f"{flag} ({path}) expired on {not_after:%Y-%m-%d %H:%M} UTC: renew it"
    if now < not_before:
        return (f"{flag} ({path}) is not valid before {not_before:%Y-%m-%d %H:%M} UTC: "
                "check this machine's clock, or reissue it")
    return None


def validity(pem: bytes) -> tuple[datetime, datetime] | None:
    """(notBefore, notAfter) of the first certificate in ``pem``; None when it cannot be read.
    A walk of the DER: Certificate > TBSCertificate > [version] serial signature issuer Validity."""
    match = _PEM_CERT.search(pem)
    try:
        der = base64.b64decode(match.group(1)) if match else b""
        _, tbs, _ = _tlv(der, 0)
        _, at, _ = _tlv(der, tbs)
        if der[at] == 0xA0:  # explicit version
            at = _tlv(der, at)[2]
        for _ in range(3):
            at = _tlv(der, at)[2]
        _, start, _ = _tlv(der, at)
        tag1, s1, e1 = _tlv(der, start)
        tag2, s2, e2 = _tlv(der, e1)
        return _time(tag1, der[s1:e1]), _time(tag2, der[s2:e2])
    except (ValueError, IndexError):
        return None


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, first byte of the value, end of the value) of the DER element at ``at``."""
    tag, size, at = der[at], der[at + 1], at + 2
    if size & 0x80:
        count = size & 0x7F
        size, at = int.from_bytes(der[at:at + count], "big"), at + count
    if at + size > len(der):
        raise ValueError("truncated DER")
    return tag, at, at + size


def _time(tag: int, raw: bytes) -> datetime:
    form = {0x17: "%y%m%d%H%M%SZ", 0x18: "%Y%m%d%H%M%SZ"}.get(tag)  # UTCTime, GeneralizedTime
    if form is None:
        raise ValueError(f"DER tag {tag:#x} is not a time")
    return datetime.strptime(raw.decode("ascii"), form).replace(tzinfo=timezone.utc)


def handshake_problem(files: TlsFiles | None, endpoint: Endpoint, details: str, timeout: float) -> str | None:
    """What is wrong, in one line naming what to fix, when gRPC reports UNAVAILABLE with
    ``details`` for ``endpoint``; None when etcd is simply not there (retry)."""
    if files is None:
        if details.endswith("Socket closed") and _serves_tls(endpoint, timeout):
            return (f"etcd at {endpoint} serves TLS: use https:// endpoints or give --etcd-cacert "
                    "(and --etcd-cert, --etcd-key if it asks for a client certificate)")
        return None
    if "handshake failed" in details.lower():
        found = _diagnose(files, endpoint, timeout)
        reason = details.rsplit("SSL_ERROR_SSL:", 1)[-1].removesuffix(": OK").strip()
        return found or (f"etcd at {endpoint}: TLS handshake failed ({reason}): check --etcd-cacert, "
                         "--etcd-cert and --etcd-key")
    if "Handshake read failed" in details and _serves_plaintext(endpoint, timeout):
        return (f"etcd at {endpoint} does not serve TLS: drop https:// and --etcd-cacert, --etcd-cert, "
                "--etcd-key, or give etcd a --cert-file and --key-file")
    return None


def _serves_tls(endpoint: Endpoint, timeout: float) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only: does it speak TLS at all
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=endpoint.host):
            return True
    except ssl.SSLError as exc:
        return "ALERT" in (exc.reason or "")  # it answered in TLS, refusing us
    except OSError:
        return False


def _serves_plaintext(endpoint: Endpoint, timeout: float) -> bool:
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as raw:
            raw.sendall(b"GET /version HTTP/1.1\r\nHost: etcd\r\n\r\n")
            return raw.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def _diagnose(files: TlsFiles, endpoint: Endpoint, timeout: float) -> str | None:
    """Why a TLS handshake with ``endpoint`` fails, as one line naming what to fix; None when
    this handshake succeeds (or the endpoint cannot be reached: then it is not about TLS)."""
    where = f"etcd at {endpoint}"
    context = ssl.create_default_context(cafile=files.cacert)
    if files.cert and files.key:
        context.load_cert_chain(files.cert, files.key, password=lambda: b"")
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=endpoint.host) as tls:
            tls.settimeout(min(timeout, 0.5))
            tls.recv(1)  # TLS 1.3: a server refuses our certificate after the handshake, here
    except ssl.SSLCertVerificationError as exc:
        return _untrusted_server(where, files, exc.verify_message or str(exc))
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if any(alert in reason for alert in _REFUSED_US):
            return _refused_us(where, files, reason)
        return f"{where}: TLS handshake failed ({reason}): check --etcd-cacert, --etcd-cert and --etcd-key"
    except OSError:  # unreachable, or nothing to read in time: the handshake itself went through
        return None
    return None


def _untrusted_server(where: str, files: TlsFiles, why: str) -> str:
    if "expired" in why:
        return f"{where}: its server certificate has expired ({why}): renew etcd's --cert-file"
    if "mismatch" in why:
        return (f"{where}: its server certificate does not name this host ({why.rstrip('.')}): "
                "connect by a name or address the certificate lists, or reissue it with this one")
    trusted = f"the CA in --etcd-cacert ({files.cacert})" if files.cacert else "the system's CAs"
    return (f"{where}: its server certificate is not signed by {trusted} ({why}): give the CA that "
            "signed etcd's --cert-file as --etcd-cacert")


def _refused_us(where: str, files: TlsFiles, reason: str) -> str:
    if not files.cert:
        return f"{where} requires a client certificate ({reason}): give --etcd-cert and --etcd-key"
    expired = validity_problem("--etcd-cert", files.cert)
    if expired:
        return f"{where} refused the client certificate: {expired}"
    return (f"{where} refused the client certificate --etcd-cert ({files.cert}) ({reason}): "
            "sign it with a CA in etcd's --trusted-ca-file")
