"""The `start` subcommand's settings: layered, validated once, then frozen.

Layers, lowest to highest: defaults, the TOML file named by ``--config``, the torchrun /
Kubeflow ``PET_*`` variables, ``ELASTIC_AGENT_<FLAG>`` variables, command-line flags.
Every value goes through the same parser whatever its source, and every mistake is a
:class:`ConfigError` with one line naming the flag, what was found and what was expected
(plus where it came from when that was not the command line).
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import secrets
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from rendezvous.settings import Settings

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_ID_FORM = "must be 1-128 characters of letters, digits, '_', '.', '-', starting with a letter or digit"
_ENDPOINTS_FORM = "must be host:port[,host:port...]"
_BOOL_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
PREEMPTION_SOURCES = ("none", "aws", "gcp", "azure", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error")
ENV_PREFIX = "ELASTIC_AGENT_"
COMMAND_LINE = "command line"


@dataclass(frozen=True)
class AgentConfig:
    min_nodes: int
    max_nodes: int
    nproc_per_node: int | str  # a positive int, or "gpu" (resolved later by agent.env.resolve_nproc)
    etcd_endpoints: tuple[tuple[str, int], ...]  # empty only with --standalone
    job_id: str
    node_id: str
    node_addr: str
    checkpoint_dir: Path | None
    max_restarts: int
    metrics_addr: str
    metrics_port: int
    standalone: bool
    prewarm: bool  # start the next workers early (interpreter + torch import) while waiting
    log_dir: Path
    shutdown_timeout: float
    lease_ttl: float
    last_call: float
    scale_up_cooldown: float
    drain_timeout: float
    hang_timeout: float
    preemption_source: str
    monitor_interval: float
    log_level: str
    config_file: Path | None
    command: tuple[str, ...]

    @property
    def endpoints_text(self) -> str:
        """The endpoints as ``host:port,host:port``, the form etcd clients take."""
        return ",".join(_join_host_port(host, port) for host, port in self.etcd_endpoints)


class _Invalid(Exception):
    """A parser's complaint: the expected form, e.g. ``must be a positive integer``."""


# ---- value parsers: raw value (str from argv/env, any TOML type from the file) -> typed value


def _int(raw: object) -> int:
    if isinstance(raw, bool):
        raise _Invalid("not a bool")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            pass
    raise _Invalid("not an int")


def _float(raw: object) -> float:
    if isinstance(raw, bool):
        raise _Invalid("not a bool")
    value: float | None = None
    if isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            value = None
    if value is None or not math.isfinite(value):
        raise _Invalid("not a number")
    return value


def _int_at_least(low: int, form: str) -> Callable[[object], int]:
    def parse(raw: object) -> int:
        try:
            value = _int(raw)
        except _Invalid:
            raise _Invalid(form) from None
        if value < low:
            raise _Invalid(form)
        return value

    return parse


def _port(raw: object) -> int:
    form = "must be an integer in 0..65535 (0 = pick a free port)"
    try:
        value = _int(raw)
    except _Invalid:
        raise _Invalid(form) from None
    if not 0 <= value <= 65535:
        raise _Invalid(form)
    return value


def _seconds(low: float, *, strict: bool) -> Callable[[object], float]:
    form = f"must be a number of seconds {'>' if strict else '>='} {low:g}"

    def parse(raw: object) -> float:
        try:
            value = _float(raw)
        except _Invalid:
            raise _Invalid(form) from None
        if value < low or (strict and value == low):
            raise _Invalid(form)
        return value

    return parse


def _bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, (str, int)) and str(raw).strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[str(raw).strip().lower()]
    raise _Invalid("must be one of 1, 0, true, false, yes, no")


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        if isinstance(raw, str) and raw.strip().lower() in choices:
            return raw.strip().lower()
        raise _Invalid(f"must be one of {'|'.join(choices)}")

    return parse


def _identifier(raw: object) -> str:
    if isinstance(raw, str) and _ID.match(raw):
        return raw
    raise _Invalid(_ID_FORM)


def _nonempty_text(form: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        if isinstance(raw, str) and raw.strip() and not any(c.isspace() for c in raw.strip()):
            return raw.strip()
        raise _Invalid(form)

    return parse


def _path(raw: object) -> Path:
    if isinstance(raw, str) and raw.strip():
        return Path(raw.strip())
    raise _Invalid("must be a non-empty path")


def _nproc(raw: object) -> int | str:
    if isinstance(raw, str) and raw.strip().lower() == "gpu":
        return "gpu"
    try:
        value = _int(raw)
    except _Invalid:
        value = 0
    if value < 1:
        raise _Invalid("must be a positive integer or 'gpu'")
    return value


def _node_range(raw: object) -> tuple[int, int]:
    """torchrun's ``--nnodes``: ``N`` or ``MIN:MAX``."""
    form = "must be N or MIN:MAX with 1 <= MIN <= MAX"
    text = str(raw).strip() if isinstance(raw, (str, int)) and not isinstance(raw, bool) else ""
    parts = text.split(":")
    try:
        low, high = (_int(parts[0]), _int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except _Invalid:
        raise _Invalid(form) from None
    if not 1 <= low <= high:
        raise _Invalid(form)
    return low, high


def _endpoint(item: str) -> tuple[str, int]:
    text = item.strip()
    if text.startswith("http://"):
        text = text[len("http://") :]
    text = text.rstrip("/")
    if text.startswith("["):  # [v6-address]:port
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host or any(c.isspace() or c in "/[]" for c in host):
        raise _Invalid(_ENDPOINTS_FORM)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _Invalid(_ENDPOINTS_FORM)
    return host, int(port_text)


def _endpoints(raw: object) -> tuple[tuple[str, int], ...]:
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        items = raw
    elif isinstance(raw, str):
        items = raw.split(",")
    else:
        raise _Invalid(_ENDPOINTS_FORM)
    if not items:
        raise _Invalid(_ENDPOINTS_FORM)
    return tuple(_endpoint(item) for item in items)


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- the options table: field name -> parser. Flags are the field names with dashes.

_PARSERS: dict[str, Callable[[object], Any]] = {
    "min_nodes": _int_at_least(1, "must be a positive integer"),
    "max_nodes": _int_at_least(1, "must be a positive integer"),
    "nnodes": _node_range,
    "nproc_per_node": _nproc,
    "etcd_endpoints": _endpoints,
    "job_id": _identifier,
    "node_id": _identifier,
    "node_addr": _nonempty_text("must be a host name or address"),
    "checkpoint_dir": _path,
    "max_restarts": _int_at_least(0, "must be an integer >= 0"),
    "metrics_addr": _nonempty_text("must be a host name or address"),
    "metrics_port": _port,
    "standalone": _bool,
    "prewarm": _bool,
    "log_dir": _path,
    "shutdown_timeout": _seconds(0, strict=True),
    "lease_ttl": _seconds(2, strict=False),
    "last_call": _seconds(0, strict=False),
    "scale_up_cooldown": _seconds(0, strict=False),
    "drain_timeout": _seconds(0, strict=True),
    "hang_timeout": _seconds(0, strict=False),
    "preemption_source": _choice(PREEMPTION_SOURCES),
    "monitor_interval": _seconds(0, strict=True),
    "log_level": _choice(LOG_LEVELS),
}

_DEFAULTS: dict[str, Any] = {
    "min_nodes": 1,
    "nproc_per_node": 1,
    "checkpoint_dir": None,
    "max_restarts": 3,
    "metrics_addr": "127.0.0.1",
    "metrics_port": 29600,
    "standalone": False,
    "prewarm": True,
    "log_dir": Path("./elastic-agent-logs"),
    "shutdown_timeout": 10.0,
    # The rendezvous timings default to the rendezvous's own defaults (one place to tune).
    "lease_ttl": Settings.lease_ttl,
    "last_call": Settings.last_call,
    "scale_up_cooldown": Settings.scale_up_cooldown,
    "drain_timeout": 60.0,
    "hang_timeout": 0.0,
    "preemption_source": "none",
    "monitor_interval": 0.1,
    "log_level": "info",
}

# torchrun / Kubeflow PyTorchJob variables we fall back on.
_PET_VARS = {
    "PET_NNODES": "nnodes",
    "PET_NPROC_PER_NODE": "nproc_per_node",
    "PET_MAX_RESTARTS": "max_restarts",
    "PET_RDZV_ID": "job_id",
    "PET_RDZV_ENDPOINT": "etcd_endpoints",
}


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_var(field: str) -> str:
    return ENV_PREFIX + field.upper()


class _Layer:
    """One source's values, parsed, each remembering where it came from."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.sources: dict[str, str] = {}

    def set(self, field: str, raw: object, source: str) -> None:
        try:
            value = _PARSERS[field](raw)
        except _Invalid as exc:
            raise ConfigError(f"{flag(field)} ({raw!r}) {exc}{_where(source)}") from None
        self.values[field] = value
        self.sources[field] = source

    def expand_nnodes(self) -> None:
        """``--nnodes MIN:MAX`` sets min and max; a disagreeing min/max in the same layer is an error."""
        if "nnodes" not in self.values:
            return
        low, high = self.values.pop("nnodes")
        source = self.sources.pop("nnodes")
        for field, value in (("min_nodes", low), ("max_nodes", high)):
            if field in self.values and self.values[field] != value:
                raise ConfigError(
                    f"--nnodes ({low}:{high}) conflicts with {flag(field)} ({self.values[field]})"
                    f"{_where(source)}: give one or the other"
                )
            self.values[field] = value
            self.sources[field] = source


def _where(source: str) -> str:
    return "" if source == COMMAND_LINE else f" (from {source})"


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str) -> Any:
        message = message.removeprefix("argument ").replace("expected one argument", "expected a value")
        raise ConfigError(message)


def _argument_parser() -> _Parser:
    parser = _Parser(
        prog="elastic-agent start",
        usage="elastic-agent start [flags] -- COMMAND [ARGS...]",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    for field in _PARSERS:
        if field == "standalone":
            parser.add_argument(flag(field), dest=field, action="store_true")
        elif field == "prewarm":
            parser.add_argument(flag(field), dest=field, action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag(field), dest=field, metavar=field.split("_")[-1].upper())
    parser.add_argument("--config", dest="config", metavar="PATH")
    return parser


def _command_line_layer(argv: list[str]) -> tuple[_Layer, str | None, tuple[str, ...]]:
    if "--" in argv:
        split = argv.index("--")
        flags, command = argv[:split], tuple(argv[split + 1 :])
    else:
        flags, command = argv, ()
    parsed, extras = _argument_parser().parse_known_args(flags)
    for extra in extras:
        if extra.startswith("-"):
            raise ConfigError(f"unknown flag {extra!r} (see elastic-agent start --help)")
        raise ConfigError(f"unexpected argument {extra!r}: put the training command after '--'")
    given = vars(parsed)
    config_path = given.pop("config", None)
    layer = _Layer()
    for field, raw in given.items():
        layer.set(field, raw, COMMAND_LINE)
    return layer, config_path, command


def _file_layer(path_text: str) -> _Layer:
    path = Path(path_text)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"--config ({path_text!r}): cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"config file {path_text}: invalid TOML: {detail}") from None
    known = list(_PARSERS)
    layer = _Layer()
    for key, raw in data.items():
        field = key.replace("-", "_")
        if field not in _PARSERS:
            hint = difflib.get_close_matches(field, known, n=1)
            suggestion = f"; did you mean '{hint[0].replace('_', '-')}'?" if hint else ""
            raise ConfigError(
                f"config file {path_text}: unknown key {key!r} "
                f"(keys are the start flags without '--', e.g. 'min-nodes'){suggestion}"
            )
        layer.set(field, raw, f"config file {path_text}")
    return layer


def _pet_layer(environ: Mapping[str, str]) -> _Layer:
    layer = _Layer()
    for name, field in _PET_VARS.items():
        if environ.get(name, "").strip():
            layer.set(field, environ[name], name)
    return layer


def _env_layer(environ: Mapping[str, str]) -> _Layer:
    layer = _Layer()
    for field in _PARSERS:
        name = env_var(field)
        if environ.get(name, "").strip():
            layer.set(field, environ[name], name)
    return layer


def _default_node_id(hostname: str, random_hex: str) -> str:
    # Host names may hold characters an id may not; keep the id readable and valid.
    base = re.sub(r"[^A-Za-z0-9_.\-]", "-", hostname).strip("-._") or "node"
    return f"{base[: 128 - 7]}-{random_hex}"


def load_config(
    argv: list[str],
    environ: Mapping[str, str],
    *,
    hostname: Callable[[], str] = socket.gethostname,
    fqdn: Callable[[], str] = socket.getfqdn,
    random_hex: Callable[[], str] = lambda: secrets.token_hex(3),
) -> AgentConfig:
    """Build the configuration of ``elastic-agent start`` from ``argv`` (after ``start``) and ``environ``.

    ``hostname``, ``fqdn`` and ``random_hex`` are injected so tests get stable defaults.
    """
    cli, config_path, command = _command_line_layer(argv)
    env = _env_layer(environ)
    if config_path is None and environ.get(env_var("config"), "").strip():
        config_path = environ[env_var("config")].strip()
    layers = [_file_layer(config_path)] if config_path else []
    layers += [_pet_layer(environ), env, cli]

    values: dict[str, Any] = dict(_DEFAULTS)
    sources: dict[str, str] = {field: "default" for field in _DEFAULTS}
    for layer in layers:
        layer.expand_nnodes()
        values.update(layer.values)
        sources.update(layer.sources)

    if not command:
        raise ConfigError("missing command: put the training command after '--'")
    if "max_nodes" not in values:
        values["max_nodes"], sources["max_nodes"] = values["min_nodes"], sources["min_nodes"]
    if values["min_nodes"] > values["max_nodes"]:
        raise ConfigError(
            f"--min-nodes ({_shown(values, sources, 'min_nodes')}) must be <= "
            f"--max-nodes ({_shown(values, sources, 'max_nodes')})"
        )

    standalone = values["standalone"]
    if standalone:
        if "etcd_endpoints" in values:
            raise ConfigError(
                f"--etcd-endpoints ({_shown(values, sources, 'etcd_endpoints')}) cannot be used "
                "with --standalone, which starts its own etcd: drop one of them"
            )
        values["etcd_endpoints"] = ()
        values.setdefault("job_id", "standalone")
        values.setdefault("node_addr", "127.0.0.1")
    else:
        for field in ("etcd_endpoints", "job_id"):
            if field not in values:
                raise ConfigError(
                    f"{flag(field)} is required (or set {env_var(field)}, or use --standalone)"
                )
    if "node_id" not in values:
        values["node_id"] = _default_node_id(hostname(), random_hex())
    if "node_addr" not in values:
        values["node_addr"] = fqdn()

    return AgentConfig(
        config_file=Path(config_path) if config_path else None,
        command=command,
        **values,
    )


def _shown(values: Mapping[str, Any], sources: Mapping[str, str], field: str) -> str:
    value = values[field]
    if field == "etcd_endpoints":
        value = repr(",".join(_join_host_port(h, p) for h, p in value))
    source = sources.get(field, "default")
    return f"{value}, from {source}" if source not in (COMMAND_LINE, "default") else f"{value}"
