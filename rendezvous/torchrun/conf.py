"""torchrun's flags and ``--rdzv-conf`` for ``--rdzv-backend etcd-v3``, validated once.

torch hands a backend its ``RendezvousParameters``: ``--rdzv-endpoint``, ``--rdzv-id``,
``--nnodes min:max``, ``--local-addr`` and the ``--rdzv-conf`` pairs (torchrun always adds
``timeout``). :func:`parse_config` turns them into our :class:`~rendezvous.settings.Settings`
and etcd credentials; a bad value is a :class:`PluginConfigError` whose one-line message names
the key or the flag the user gave (torch's own names, not ours). Table: docs/torchrun-plugin.md.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rendezvous.errors import StoreConfigError
from rendezvous.etcd.auth import Credentials
from rendezvous.etcd.store import EtcdStore
from rendezvous.net import parse_endpoints, uses_tls
from rendezvous.settings import Settings
from rendezvous.store import Store
from rendezvous.torchrun.c10d_store import DEFAULT_TIMEOUT

log = logging.getLogger(__name__)

BACKEND = "etcd-v3"
PASSWORD_VAR = "ELASTIC_AGENT_ETCD_PASSWORD"  # --rdzv-conf user's password: never on a command line
DEFAULT_JOIN_TIMEOUT = 900.0  # torchrun's default --rdzv-timeout

# --rdzv-conf: ours, then torch's generic keys (torchrun always passes ``timeout``).
_SECONDS = ("lease_ttl", "presence_ttl", "last_call", "rejoin_call", "scale_up_cooldown")
_TIMEOUTS = ("join_timeout", "store_timeout")
_TEXT = ("cacert", "cert", "key", "user")
_ALIASES = {"timeout": "join_timeout", "last_call_timeout": "last_call"}
# c10d's heartbeat and store settings: leases replace heartbeats, and the store is in etcd.
_IGNORED = ("keep_alive_interval", "keep_alive_max_attempt", "heartbeat", "close_timeout", "read_timeout",
            "is_host", "store_type")
KNOWN_KEYS = (*_SECONDS, "max_restarts", *_TIMEOUTS, *_TEXT, *_ALIASES, *_IGNORED)
_FLAGS = {"job_id": "--rdzv-id", "min_nodes": "--nnodes"}  # Settings fields torchrun's flags give


class PluginConfigError(ValueError):
    """A bad torchrun flag or --rdzv-conf value; the one-line message names it."""


@dataclass(frozen=True)
class PluginConfig:
    settings: Settings
    endpoints: str
    credentials: Credentials
    addr: str  # where peers reach this node (group rank 0's workers host the master here)
    join_timeout: float = DEFAULT_JOIN_TIMEOUT
    store_timeout: float = DEFAULT_TIMEOUT


def parse_config(params: Any, environ: Mapping[str, str] = os.environ) -> PluginConfig:
    """torch's RendezvousParameters -> PluginConfig; raises PluginConfigError naming the key."""
    values = _conf_values(params.config)
    try:
        settings = Settings(job_id=params.run_id, min_nodes=params.min_nodes, max_nodes=params.max_nodes,
                            **{k: values[k] for k in (*_SECONDS, "max_restarts") if k in values})
    except ValueError as exc:
        raise PluginConfigError(_name_the_key(str(exc))) from None
    endpoints = (params.endpoint or "").strip()
    try:
        parse_endpoints(endpoints)
        tls = uses_tls(endpoints)
    except ValueError as exc:
        raise PluginConfigError(f"--rdzv-endpoint ({endpoints!r}): {exc}") from None
    credentials = Credentials(tls=tls, cacert=values.get("cacert"), cert=values.get("cert"), key=values.get("key"),
                              user=values.get("user"), password=environ.get(PASSWORD_VAR) or None,
                              scope=settings.root)
    return PluginConfig(settings, endpoints, credentials, params.local_addr or socket.getfqdn(),
                        values.get("join_timeout", DEFAULT_JOIN_TIMEOUT), values.get("store_timeout", DEFAULT_TIMEOUT))


def _conf_values(config: Mapping[str, Any]) -> dict[str, Any]:
    """--rdzv-conf pairs under our names, each checked for its type."""
    values: dict[str, Any] = {}
    for key, raw in config.items():
        key, raw = _unquoted(key), _unquoted(raw)
        name = _ALIASES.get(key, key)
        if key in _IGNORED:
            log.warning("--rdzv-conf %s is ignored by %s: leases replace heartbeats and the store is in etcd",
                        key, BACKEND)
            continue
        if name in _SECONDS or name in _TIMEOUTS:
            value = _number(key, raw, positive=name in _TIMEOUTS)
            if name in values and values[name] != value:  # the same value twice says one thing
                raise PluginConfigError(f"--rdzv-conf {key} and {name} are the same setting: give one")
            values[name] = value
        elif name == "max_restarts":
            values[name] = _number(key, raw, whole=True)
        elif name in _TEXT:
            values[name] = str(raw).strip()
            if not values[name]:
                raise PluginConfigError(f"--rdzv-conf {key} is empty")
        else:
            raise PluginConfigError(f"--rdzv-conf {key}={raw}: unknown key; {BACKEND} takes {', '.join(KNOWN_KEYS)}")
    return values


def _unquoted(text: Any) -> Any:
    """Without the quotes a shell would have removed: ``--rdzv-conf='a=1,b=2'`` passed as one
    argv element (a subprocess list, torch's own launcher tests) reaches torch's parser with
    them, which splits it into ``'a`` = ``1`` and ``b`` = ``2'``. The pairs still say what the
    user meant; c10d would silently ignore the first key, and refusing it would fail a command
    that works there."""
    return text.strip().strip("'\"") if isinstance(text, str) else text


def _number(key: str, raw: Any, *, whole: bool = False, positive: bool = False) -> Any:
    try:
        value = int(str(raw).strip()) if whole else float(str(raw).strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        form = "a whole number >= 0" if whole else f"a number of seconds {'> 0' if positive else '>= 0'}"
        raise PluginConfigError(f"--rdzv-conf {key}={raw}: expected {form}")
    return value


def _name_the_key(message: str) -> str:
    """Settings' messages open with the field in words ("lease ttl (1.0) must be ..."): name
    the key or the flag a torchrun user gave instead."""
    head = message.split(" (", 1)[0]
    field = re.sub(r"[ -]", "_", head)
    flag = _FLAGS.get(field) or (f"--rdzv-conf {field}" if field in (*_SECONDS, "max_restarts") else None)
    return flag + message[len(head):] if flag else message


def open_store(config: PluginConfig) -> Store:
    """The etcd adapter, TLS files checked now (errors name the --rdzv-conf key)."""
    try:
        return EtcdStore(config.endpoints, credentials=config.credentials)
    except StoreConfigError as exc:
        raise PluginConfigError(re.sub(r"--etcd-(cacert|cert|key)\b", r"--rdzv-conf \1", str(exc))) from None
