"""The `start` subcommand's settings: layered, validated once, then frozen.

Layers, lowest to highest: defaults, the TOML file named by ``--config``, the torchrun /
Kubeflow ``PET_*`` variables, ``ELASTIC_AGENT_<FLAG>`` variables, command-line flags.
Every value goes through the same parser whatever its source, and every mistake is a
:class:`ConfigError` with one line naming the flag, what was found and what was expected
(plus where it came from when that was not the command line).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import secrets
import socket
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.daemon.config.console import DEFAULT_TEMPLATE, PerRank
from agent.daemon.config.node_identity import kept_suffix
from agent.daemon.config.options import (
    BY_FIELD,
    CONNECTION_FIELDS,
    OPTIONS,
    PET_VARS,
    defaults,
    env_var,
    flag,
    start_parser,
)
from agent.daemon.config.values import Invalid
from agent.errors import ConfigError
from rendezvous.net import Endpoint, endpoints_text
from rendezvous.settings import Settings

COMMAND_LINE = "command line"


@dataclass(frozen=True)
class AgentConfig:
    min_nodes: int
    max_nodes: int
    nproc_per_node: int | str  # a positive int, or "gpu" (resolved later by agent.env.resolve_nproc)
    etcd_endpoints: tuple[Endpoint, ...]  # empty only with --standalone
    job_id: str
    node_id: str
    node_addr: str
    checkpoint_dir: Path | None  # absolute
    max_restarts: int
    metrics_addr: str
    metrics_port: int
    standalone: bool
    prewarm: bool  # start the next workers early (interpreter + torch import) while waiting
    log_dir: Path  # absolute
    log_keep: int
    shutdown_timeout: float
    lease_ttl: float
    presence_ttl: float
    etcd_wait: float
    last_call: float
    scale_up_cooldown: float
    drain_timeout: float
    hang_timeout: float
    preemption_source: str
    monitor_interval: float
    log_level: str
    etcd_cacert: Path | None  # TLS and authentication to etcd: docs/security.md
    etcd_cert: Path | None
    etcd_key: Path | None
    etcd_user: str | None
    etcd_password_file: Path | None
    config_file: Path | None
    command: tuple[str, ...]
    etcd_password: str | None = dataclasses.field(default=None, repr=False)  # never shown: see etcd_password()
    # What of the workers' output reaches the console (agent.daemon.config.console), and torch.distributed.launch's
    # --local-rank=N argument.
    redirects: PerRank = dataclasses.field(default_factory=PerRank)
    tee: PerRank = dataclasses.field(default_factory=PerRank)
    local_ranks_filter: frozenset[int] | None = None
    log_line_prefix_template: str = DEFAULT_TEMPLATE
    log_line_prefix: bool = True
    local_rank_arg: bool = False
    exit_barrier_timeout: float = 300.0  # torch's exit barrier's default
    abort_timeout: float = 2.0  # SIGTERM to SIGKILL after an unplanned loss (agent.daemon.workers.local)
    straggler_evict: bool = False  # agent.daemon.straggler_watch
    straggler_factor: float = 2.0
    straggler_window: float = 300.0

    def rendezvous_settings(self) -> Settings:
        return Settings(
            job_id=self.job_id, min_nodes=self.min_nodes, max_nodes=self.max_nodes,
            lease_ttl=self.lease_ttl, presence_ttl=self.presence_ttl, last_call=self.last_call,
            scale_up_cooldown=self.scale_up_cooldown, max_restarts=self.max_restarts,
        )

    @property
    def endpoints_text(self) -> str:
        """The endpoints as ``host:port,host:port``, the form etcd clients take."""
        return endpoints_text(self.etcd_endpoints)


class _Layer:
    """One source's values, parsed, each remembering where it came from."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.sources: dict[str, str] = {}

    def set(self, field: str, raw: object, source: str) -> None:
        try:
            value = BY_FIELD[field].parse(raw)
        except Invalid as exc:
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


def _command_line_layer(argv: list[str]) -> tuple[_Layer, str | None, tuple[str, ...]]:
    if "--" in argv:
        split = argv.index("--")
        flags, command = argv[:split], tuple(argv[split + 1 :])
    else:
        flags, command = argv, ()
    parsed, extras = start_parser().parse_known_args(flags)
    for extra in extras:
        if extra.split("=")[0] == flag("etcd_password"):
            raise ConfigError(NO_PASSWORD_FLAG)
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
    except UnicodeDecodeError as exc:  # tomllib decodes the bytes before it parses them
        raise ConfigError(f"config file {path_text}: invalid TOML: not UTF-8 (byte {exc.start})") from None
    known = [o.field for o in OPTIONS]
    layer = _Layer()
    for key, raw in data.items():
        field = key.replace("-", "_")
        if field == "etcd_password":
            raise ConfigError(f"config file {path_text}: key 'etcd-password' is not accepted: "
                              f"set {PASSWORD_VAR} or etcd-password-file")
        if field not in BY_FIELD:
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
    for name, field in PET_VARS.items():
        if environ.get(name, "").strip():
            layer.set(field, environ[name], name)
    return layer


def _env_layer(environ: Mapping[str, str]) -> _Layer:
    layer = _Layer()
    for field in BY_FIELD:
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
    id_dir: Path | None = None,
) -> AgentConfig:
    """Build the configuration of ``elastic-agent start`` from ``argv`` (after ``start``) and ``environ``.

    ``hostname``, ``fqdn`` and ``random_hex`` are injected so tests get stable defaults.
    ``id_dir``: where the default node id's suffix is kept across restarts (node_identity);
    None: a new one each time.
    """
    cli, config_path, command = _command_line_layer(argv)
    env = _env_layer(environ)
    if config_path is None and environ.get(env_var("config"), "").strip():
        config_path = environ[env_var("config")].strip()
    layers = [_file_layer(config_path)] if config_path else []
    layers += [_pet_layer(environ), env, cli]

    values: dict[str, Any] = defaults()
    sources: dict[str, str] = {field: "default" for field in values}
    for layer in layers:
        layer.expand_nnodes()
        values.update(layer.values)
        sources.update(layer.sources)

    if not command:
        raise ConfigError("missing command: put the training command after '--'")
    if "max_nodes" not in values:
        values["max_nodes"], sources["max_nodes"] = values["min_nodes"], sources["min_nodes"]
    if values["presence_ttl"] > values["lease_ttl"]:
        raise ConfigError(
            f"--presence-ttl ({_shown(values, sources, 'presence_ttl')}) must be <= "
            f"--lease-ttl ({_shown(values, sources, 'lease_ttl')})"
        )
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
        secured = [f for f in CONNECTION_FIELDS if values.get(f) is not None]
        if secured:
            raise ConfigError(
                f"{flag(secured[0])} ({_shown(values, sources, secured[0])}) cannot be used with "
                "--standalone, whose embedded etcd serves plaintext on 127.0.0.1 only: drop one of them"
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
    # Absolute, so a worker that changes directory still finds them (torchrun does the same).
    for field in ("log_dir", "checkpoint_dir"):
        if values.get(field) is not None:
            values[field] = Path(os.path.abspath(os.path.expanduser(values[field])))
    if "node_id" not in values:
        host = hostname()
        kept = kept_suffix(id_dir, host, values["job_id"], random_hex) if id_dir is not None else None
        values["node_id"] = _default_node_id(host, kept or random_hex())
    if "node_addr" not in values:
        values["node_addr"] = fqdn()

    return AgentConfig(
        config_file=Path(config_path) if config_path else None,
        command=command,
        etcd_password=etcd_password(values.get("etcd_user"), values.get("etcd_password_file"), environ),
        **values,
    )


PASSWORD_VAR = env_var("etcd_password")
NO_PASSWORD_FLAG = (f"--etcd-password is not accepted: a command line is visible to every user of "
                     f"this machine (ps); set {PASSWORD_VAR} or --etcd-password-file")


def etcd_password(user: str | None, password_file: Path | None, environ: Mapping[str, str]) -> str | None:
    """--etcd-user's password, from ``ELASTIC_AGENT_ETCD_PASSWORD`` or --etcd-password-file
    (one line; the newline that ends it is not part of it). Never a flag, never in a config
    file. Errors name where the password was looked for, never the password."""
    from_env = environ.get(PASSWORD_VAR) or None
    if from_env is not None and password_file is not None:
        raise ConfigError(f"{PASSWORD_VAR} and --etcd-password-file ({password_file}) are both set: "
                          "give the password one way")
    password, source = from_env, PASSWORD_VAR
    if password_file is not None:
        source = f"--etcd-password-file ({password_file})"
        try:
            password = password_file.read_text(encoding="utf-8").rstrip("\r\n") or None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
        if password is None:
            raise ConfigError(f"{source} is empty: write --etcd-user's password in it")
    if password is not None and not user:
        raise ConfigError(f"a password is set ({source}) but --etcd-user is not: give the user it belongs to")
    if user and password is None:
        raise ConfigError(f"--etcd-user ({user}) needs a password: set {PASSWORD_VAR} or --etcd-password-file "
                          "(a certificate-only user needs no --etcd-user: etcd takes it from the "
                          "certificate's CN)")
    return password


def _shown(values: Mapping[str, Any], sources: Mapping[str, str], field: str) -> str:
    value = values[field]
    if field == "etcd_endpoints":
        value = repr(endpoints_text(value))
    source = sources.get(field, "default")
    return f"{value}, from {source}" if source not in (COMMAND_LINE, "default") else f"{value}"


def prepare_directories(config: AgentConfig) -> None:
    """Create --log-dir and --checkpoint-dir if needed and prove they are writable, so a
    bad path is one line at start-up, not a traceback when the first worker starts."""
    for field, path in (("log_dir", config.log_dir), ("checkpoint_dir", config.checkpoint_dir)):
        if path is None:
            continue
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".elastic-agent-probe-"):
                pass
        except OSError as exc:
            raise ConfigError(f"{flag(field)} ({path}): cannot create or write there: "
                              f"{exc.strerror or exc}") from None
