"""Every setting of ``elastic-agent start`` in one table: its flag, value parser, default and
help line. The argument parser, the environment and config-file layers, ``--help`` and the
README's flag table (checked by a test) all come from here, so they cannot drift apart.

A setting ``min_nodes`` is the flag ``--min-nodes``, the variable ``ELASTIC_AGENT_MIN_NODES``
and the config-file key ``min-nodes``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.daemon.config import console as c
from agent.daemon.config import values as v
from agent.errors import ConfigError
from rendezvous.settings import Settings

ENV_PREFIX = "ELASTIC_AGENT_"
PREEMPTION_SOURCES = ("none", "aws", "gcp", "azure", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error")
NO_DEFAULT = object()  # required, or derived from other settings (see agent.daemon.config.layers)

VALUE, SWITCH, TOGGLE = "value", "switch", "toggle"  # --flag X, --flag, --flag/--no-flag


@dataclass(frozen=True)
class Option:
    field: str
    parse: Callable[[object], Any]
    help: str
    default: Any = NO_DEFAULT
    metavar: str = ""
    kind: str = VALUE

    @property
    def flag(self) -> str:
        return flag(self.field)

    @property
    def env_var(self) -> str:
        return env_var(self.field)


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_var(field: str) -> str:
    return ENV_PREFIX + field.upper()


_HOST = v.word("must be a host name or address")

OPTIONS: tuple[Option, ...] = (
    Option("min_nodes", v.int_at_least(1, "must be a positive integer"),
           "fewest nodes the job trains with", 1, "N"),
    Option("max_nodes", v.int_at_least(1, "must be a positive integer"),
           "most nodes the job trains with; more wait as standbys (default: --min-nodes)", metavar="N"),
    Option("nnodes", v.node_range, "torchrun's form of both bounds: N or MIN:MAX", metavar="MIN:MAX"),
    Option("nproc_per_node", v.nproc, "workers on this node; 'gpu' = one per visible GPU", 1, "N|gpu"),
    Option("etcd_endpoints", v.endpoints, "your etcd cluster: host:port[,host:port...] (required)",
           metavar="HOST:PORT,..."),
    Option("job_id", v.identifier, "names the job in etcd; the same on every node (required)", metavar="ID"),
    Option("node_id", v.identifier, "unique per node (default: hostname plus a random suffix)", metavar="ID"),
    Option("node_addr", _HOST, "address other nodes reach this node's rank-0 worker on (default: FQDN)",
           metavar="HOST"),
    Option("checkpoint_dir", v.path, "shared checkpoint directory, given to workers as "
           "ELASTIC_AGENT_CHECKPOINT_DIR", None, "PATH"),
    Option("max_restarts", v.int_at_least(0, "must be an integer >= 0"),
           "job-wide budget of restarts caused by worker failures", 3, "N"),
    Option("metrics_addr", _HOST, "address of /metrics, /livez and /readyz", "127.0.0.1", "HOST"),
    Option("metrics_port", v.port, "port of /metrics, /livez and /readyz (0 = pick a free one, logged)",
           29600, "PORT"),
    Option("standalone", v.boolean, "single machine: start an embedded etcd on 127.0.0.1", False,
           kind=SWITCH),
    Option("prewarm", v.boolean, "pre-start the next workers (python SCRIPT / python -m MOD) so they "
           "import torch while the rendezvous runs", True, kind=TOGGLE),
    Option("log_dir", v.path, "where each worker's stdout, stderr and error file go, under "
           "<job-id>/<node-id>/<attempt>/", Path("./elastic-agent-logs"), "PATH"),
    Option("log_keep", v.int_at_least(1, "must be a positive integer"), "attempts of this node whose "
           "logs are kept; the oldest beyond are deleted", 100, "N"),
    # What of the workers' output reaches the console, with torchrun's meaning (agent.daemon.config.console).
    Option("redirects", c.per_rank_streams, "worker streams kept off the console (log files only): 0 "
           "none, 1 stdout, 2 stderr, 3 both, or per local rank 0:1,1:2 (torchrun's --redirects)",
           c.PerRank(), "SPEC"),
    Option("tee", c.per_rank_streams, "worker streams shown on the console even when --redirects "
           "names them (torchrun's --tee; same forms)", c.PerRank(), "SPEC"),
    Option("local_ranks_filter", c.local_ranks, "only these local ranks' output reaches the console, "
           "e.g. 0 or 0,1 (default: every rank); the log files get all of it", None, "RANKS"),
    Option("log_line_prefix_template", c.prefix_template, "what each worker line on the console starts "
           "with: ${node_id}, ${rank}, ${local_rank}, ${role_name}; empty = nothing (torchrun's "
           "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE)", c.DEFAULT_TEMPLATE, "TEMPLATE"),
    Option("log_line_prefix", v.boolean, "start each worker line on the console with "
           "--log-line-prefix-template; --no-log-line-prefix shows lines as written", True, kind=TOGGLE),
    Option("local_rank_arg", v.boolean, "pass --local-rank=N to the script, as torch.distributed.launch "
           "did, for scripts that parse it", False, kind=SWITCH),
    Option("shutdown_timeout", v.seconds(0, strict=True),
           "seconds between SIGTERM and SIGKILL when stopping workers", 10.0, "SECONDS"),
    Option("abort_timeout", v.seconds(0, strict=True),
           "seconds between SIGTERM and SIGKILL after an unplanned loss (a node lost, a worker "
           "failure, a hang, a lost lease): a collective is broken, so a SIGTERM handler may never run; "
           "planned stops keep --shutdown-timeout", 2.0, "SECONDS"),
    # The rendezvous timings default to the rendezvous's own defaults (one place to tune).
    Option("lease_ttl", v.seconds(2, strict=False), "a node cut off from etcd this long loses its "
           "membership; it stops (fences) its own workers before", Settings.lease_ttl, "SECONDS"),
    Option("presence_ttl", v.seconds(2, strict=False), "a node silent this long (frozen, cut off, "
           "reclaimed) is replaced: the others restart without it", Settings.presence_ttl, "SECONDS"),
    Option("etcd_wait", v.seconds(0, strict=False), "at start, how long to wait for etcd to answer "
           "(with backoff) before giving up with exit 1", 300.0, "SECONDS"),
    Option("last_call", v.seconds(0, strict=False), "after min nodes joined, close the round when no "
           "node joined for this long", Settings.last_call, "SECONDS"),
    Option("scale_up_cooldown", v.seconds(0, strict=False), "a waiting node must stay alive this long "
           "before it grows the job", Settings.scale_up_cooldown, "SECONDS"),
    Option("drain_timeout", v.seconds(0, strict=True), "how long workers get to checkpoint at a step "
           "boundary when leaving", 60.0, "SECONDS"),
    Option("exit_barrier_timeout", v.seconds(0, strict=True), "once this node's workers and every "
           "other node's but one exited 0, wait this long for that one; then the job ends as "
           "succeeded and that node stops its workers", 300.0, "SECONDS"),
    Option("hang_timeout", v.seconds(0, strict=False), "restart when a worker using the helper reports "
           "no step for this long (0 = off)", 0.0, "SECONDS"),
    # Stragglers (agent.observe.stragglers): always measured and exported; removed only when asked.
    Option("straggler_evict", v.boolean, "leave the job (at a step boundary, as on SIGTERM) when this "
           "node's steps stay --straggler-factor times slower than the job's median for "
           "--straggler-window", False, kind=SWITCH),
    Option("straggler_factor", v.number_above(1, "must be a number > 1"), "how many times the job's "
           "median step time counts as a straggler", 2.0, "FACTOR"),
    Option("straggler_window", v.seconds(4, strict=False), "how long a node must stay that slow, "
           "every comparison, before it is called a straggler", 300.0, "SECONDS"),
    Option("preemption_source", v.choice(PREEMPTION_SOURCES), "poll this cloud's metadata for a "
           "preemption notice: " + "|".join(PREEMPTION_SOURCES), "none", "SOURCE"),
    Option("monitor_interval", v.seconds(0, strict=True), "how often the agent polls its workers", 0.1,
           "SECONDS"),
    Option("log_level", v.choice(LOG_LEVELS), "agent log level: " + "|".join(LOG_LEVELS), "info", "LEVEL"),
    # Connecting to a secured etcd (docs/security.md). The password is never a flag: see
    # agent.daemon.config.layers.etcd_password.
    Option("etcd_cacert", v.path, "CA certificate that signed etcd's server certificate; turns on "
           "TLS (as do https:// endpoints)", None, "PATH"),
    Option("etcd_cert", v.path, "client certificate, for an etcd with --client-cert-auth (with "
           "--etcd-key)", None, "PATH"),
    Option("etcd_key", v.path, "private key (unencrypted PEM) of --etcd-cert", None, "PATH"),
    Option("etcd_user", v.word("must be an etcd user name"), "etcd user; its password comes from "
           "ELASTIC_AGENT_ETCD_PASSWORD or --etcd-password-file", None, "NAME"),
    Option("etcd_password_file", v.path, "file holding --etcd-user's password (one line)", None, "PATH"),
)
BY_FIELD = {option.field: option for option in OPTIONS}
# How to reach a secured etcd: ``status`` takes these too (agent.daemon.connection.connect).
CONNECTION_FIELDS = ("etcd_cacert", "etcd_cert", "etcd_key", "etcd_user", "etcd_password_file")
CONFIG_HELP = "a TOML file of the same settings (min-nodes = 2)"

# torchrun / Kubeflow PyTorchJob variables we fall back on.
PET_VARS = {
    "PET_NNODES": "nnodes",
    "PET_NPROC_PER_NODE": "nproc_per_node",
    "PET_MAX_RESTARTS": "max_restarts",
    "PET_RDZV_ID": "job_id",
    "PET_RDZV_ENDPOINT": "etcd_endpoints",
    "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "log_line_prefix_template",  # torchrun reads it too
}


def defaults() -> dict[str, Any]:
    return {o.field: o.default for o in OPTIONS if o.default is not NO_DEFAULT}


class RaisingParser(argparse.ArgumentParser):
    """argparse that raises :class:`ConfigError` instead of printing usage and exiting 2, so
    every usage mistake leaves through the same one-line path."""

    def error(self, message: str) -> Any:
        message = message.removeprefix("argument ").replace("expected one argument", "expected a value")
        raise ConfigError(message)


def start_parser() -> RaisingParser:
    parser = RaisingParser(
        prog="elastic-agent start",
        usage="elastic-agent start [flags] -- COMMAND [ARGS...]",
        description="Run one node of an elastic training job. Every flag can also be set as "
                    f"{ENV_PREFIX}<FLAG> or in the --config file.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    for option in OPTIONS:
        shown = "" if option.default in (NO_DEFAULT, None, False, "") else f" (default: {option.default})"
        if option.kind == SWITCH:
            parser.add_argument(option.flag, dest=option.field, action="store_true", help=option.help)
        elif option.kind == TOGGLE:
            parser.add_argument(option.flag, dest=option.field, action=argparse.BooleanOptionalAction,
                                help=option.help + shown)
        else:
            parser.add_argument(option.flag, dest=option.field, metavar=option.metavar,
                                help=option.help + shown)
    parser.add_argument("--config", dest="config", metavar="PATH", help=CONFIG_HELP)
    return parser


def flags() -> set[str]:
    """Every flag ``start`` accepts, as a user types it (``--no-prewarm`` included)."""
    out = {o.flag for o in OPTIONS} | {"--config"}
    out |= {"--no-" + o.flag[2:] for o in OPTIONS if o.kind == TOGGLE}
    return out
