"""Opening the etcd store as the user configured it: the endpoints (``https://`` for TLS), a
CA, a client certificate and key, and an etcd user with its password (docs/security.md).

``start`` and ``status`` both come through here, so they take the same settings and fail
the same way: a file that cannot be used, or a handshake, login or permission that etcd
refuses, is one line naming what to fix, and exit 2 (:func:`usage_error`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.daemon.config.layers import NO_PASSWORD_FLAG, AgentConfig, etcd_password
from agent.daemon.config.options import BY_FIELD, CONNECTION_FIELDS, env_var
from agent.daemon.config.values import Invalid, TlsEndpoints
from agent.errors import ConfigError
from rendezvous.errors import StoreConfigError
from rendezvous.etcd.auth import Credentials
from rendezvous.etcd.store import EtcdStore
from rendezvous.net import uses_tls
from rendezvous.settings import Settings

log = logging.getLogger("elastic_agent")


def open_store(config: AgentConfig, endpoints: str, **options: Any) -> EtcdStore:
    """The store of ``elastic-agent start``; ``endpoints`` are the configured ones or, with
    --standalone, the embedded etcd's (plaintext on 127.0.0.1; config refuses TLS settings)."""
    credentials = Credentials(
        tls=isinstance(config.etcd_endpoints, TlsEndpoints), cacert=_text(config.etcd_cacert),
        cert=_text(config.etcd_cert), key=_text(config.etcd_key), user=config.etcd_user,
        password=config.etcd_password, scope=config.rendezvous_settings().root,
    )
    store = _open(endpoints, credentials, options)
    log.info("etcd at %s: %s", endpoints, describe(credentials))
    return store


def describe(c: Credentials) -> str:
    """How we connect, for the log: files and the user by name, never what they hold."""
    ca = f"CA {c.cacert}" if c.cacert else "the system's CAs"
    cert = f"client certificate {c.cert}" if c.cert else "no client certificate"
    tls = f"TLS ({ca}, {cert})" if c.uses_tls else "plaintext"
    who = (f"as etcd user {c.user!r} (password given)" if c.user
           else "as the user named by the certificate's CN" if c.cert else "without an etcd user")
    return f"{tls}, {who}"


def add_flags(parser: argparse.ArgumentParser) -> None:
    """``start``'s connection flags, for ``status``."""
    for field in CONNECTION_FIELDS:
        option = BY_FIELD[field]
        parser.add_argument(option.flag, dest=field, metavar=option.metavar,
                            help=f"{option.help} (or {option.env_var})")
    parser.add_argument("--etcd-password", nargs="?", action=_RefusePassword, help=argparse.SUPPRESS)


class _RefusePassword(argparse.Action):
    def __call__(self, *args: object, **kwargs: object) -> None:
        raise ConfigError(NO_PASSWORD_FLAG)


def status_store(args: argparse.Namespace, environ: Mapping[str, str], **options: Any) -> EtcdStore:
    """The store of ``elastic-agent status``: its flags, else the same ``ELASTIC_AGENT_*``
    variables as ``start``."""
    values: dict[str, Any] = {}
    for field in CONNECTION_FIELDS:
        raw, where = getattr(args, field, None), ""
        if raw is None and environ.get(env_var(field), "").strip():
            raw, where = environ[env_var(field)], f" (from {env_var(field)})"
        try:
            values[field] = None if raw is None else BY_FIELD[field].parse(raw)
        except Invalid as exc:
            raise ConfigError(f"{BY_FIELD[field].flag} ({raw!r}) {exc}{where}") from None
    try:
        tls = uses_tls(args.etcd_endpoints)
    except ValueError as exc:
        raise ConfigError(f"--etcd-endpoints ({args.etcd_endpoints!r}): {exc}") from exc
    try:
        scope = Settings(job_id=args.job_id, min_nodes=1, max_nodes=1).root
    except ValueError:
        scope = ""  # a bad --job-id is reported with the first request
    credentials = Credentials(
        tls=tls, cacert=_text(values["etcd_cacert"]), cert=_text(values["etcd_cert"]),
        key=_text(values["etcd_key"]), user=values["etcd_user"], scope=scope,
        password=etcd_password(values["etcd_user"], values["etcd_password_file"], environ),
    )
    return _open(args.etcd_endpoints, credentials, options)


def usage_error(exc: StoreConfigError) -> ConfigError:
    """etcd refused our TLS, login or permissions: a configuration mistake, exit 2."""
    return ConfigError(str(exc))


def _open(endpoints: str, credentials: Credentials, options: dict[str, Any]) -> EtcdStore:
    try:
        return EtcdStore(endpoints, credentials=credentials, **options)  # reads the TLS files now
    except StoreConfigError as exc:
        raise usage_error(exc) from exc


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)
