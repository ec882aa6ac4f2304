"""Addresses: etcd endpoint lists, ``host:port`` text, and free ports. One parser for all.

An endpoint is ``host:port``, ``[v6-address]:port``, or either with ``http://`` or
``https://`` in front (https: use TLS). ``host:port,host:port`` lists several members.
"""

from __future__ import annotations

import socket
from typing import NamedTuple

ENDPOINTS_FORM = "must be host:port[,host:port...] (optionally http:// or https://, [v6]:port)"


class Endpoint(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return host_port(self.host, self.port)


def host_port(host: str, port: int) -> str:
    """``host:port``, bracketing an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _scheme(text: str) -> tuple[str, str]:
    item = text.strip()
    for scheme in ("https://", "http://"):
        if item.startswith(scheme):
            return scheme[:-3], item[len(scheme):]
    return "", item


def parse_endpoint(text: str) -> Endpoint:
    """One endpoint; raises ValueError naming the item and the expected form."""
    _, item = _scheme(text)
    item = item.rstrip("/")
    if item.startswith("["):  # [v6-address]:port
        host, sep, port = item[1:].partition("]:")
    else:
        host, sep, port = item.rpartition(":")
    if not sep or not host or any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(f"etcd endpoint {text.strip()!r} {ENDPOINTS_FORM}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"etcd endpoint {text.strip()!r}: port must be 1..65535")
    return Endpoint(host, int(port))


def parse_endpoints(value: str | list[str] | tuple[str, ...]) -> tuple[Endpoint, ...]:
    """A comma-separated list (or a list of items) of endpoints, at least one."""
    items = value.split(",") if isinstance(value, str) else list(value)
    if not items or not all(isinstance(item, str) for item in items) or not any(i.strip() for i in items):
        raise ValueError(f"etcd endpoints {ENDPOINTS_FORM}")
    return tuple(parse_endpoint(item) for item in items)


def uses_tls(value: str | list[str] | tuple[str, ...]) -> bool:
    """Whether the endpoints were given as ``https://``; mixing schemes is a ValueError."""
    items = value.split(",") if isinstance(value, str) else list(value)
    schemes = {_scheme(item)[0] or "http" for item in items if item.strip()}
    if len(schemes) > 1:
        raise ValueError("etcd endpoints mix http:// and https://: use one scheme for every member")
    return schemes == {"https"}


def endpoints_text(endpoints: tuple[Endpoint, ...]) -> str:
    return ",".join(str(e) for e in endpoints)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now ("" = every interface). It may be taken by someone
    else before it is used: callers bind it soon, or retry."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
