"""``elastic-agent``: the command line.

    elastic-agent start [flags] -- COMMAND [ARGS...]
    elastic-agent status --etcd-endpoints HOST:PORT[,...] --job-id ID [--json]

Exit codes: 0 job succeeded; 1 job failed; 2 bad usage or configuration; 3 left cleanly
(preempted). User mistakes get one line naming the setting, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TYPE_CHECKING

from agent.common.states import State
from agent.errors import EXIT_FAILED, EXIT_USAGE, AgentError, ConfigError

if TYPE_CHECKING:  # imported at run time only once the command line is read (torch-free, fast --help)
    from agent.daemon.loop import Agent

EMBEDDED_ETCD_ARGS = ("--auto-compaction-mode", "periodic", "--auto-compaction-retention", "10m")

USAGE = """usage: elastic-agent start [flags] -- COMMAND [ARGS...]
       elastic-agent status --etcd-endpoints HOST:PORT[,...] --job-id ID [--json]

Run `elastic-agent start --help` or `elastic-agent status --help` for the flags."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    try:
        if command == "start":
            return _start(rest)
        if command == "status":
            return _status(rest)
        if command in ("--version", "version"):
            from agent import __version__  # noqa: PLC0415

            print(f"elastic-agent {__version__}")
            return 0
        raise ConfigError(f"unknown command {command!r}: expected 'start' or 'status'")
    except ConfigError as exc:
        print(f"elastic-agent: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED


def _start(argv: list[str]) -> int:
    from agent.daemon.config import node_identity  # noqa: PLC0415
    from agent.daemon.config.layers import load_config, prepare_directories  # noqa: PLC0415

    if argv and argv[0] in ("-h", "--help"):
        from agent.daemon.config.options import start_parser  # noqa: PLC0415

        start_parser().print_help()
        return 0
    config = load_config(argv, os.environ, id_dir=node_identity.state_dir())
    from agent.daemon.config.layers import PASSWORD_VAR  # noqa: PLC0415

    os.environ.pop(PASSWORD_VAR, None)  # read: workers inherit our environment, not our etcd password
    from agent.daemon.workers.spawn import check_command  # noqa: PLC0415

    try:
        check_command(config.command)
    except AgentError as exc:
        raise ConfigError(str(exc)) from exc
    prepare_directories(config)
    _setup_logging(config.log_level, config.node_id)
    log = logging.getLogger("elastic_agent")

    from agent.daemon.connection.connect import open_store, usage_error  # noqa: PLC0415
    from agent.daemon.loop import Agent  # noqa: PLC0415
    from agent.daemon.signals import Signals  # noqa: PLC0415
    from agent.daemon.workers.local import snapshots_of  # noqa: PLC0415
    from agent.observe.collectors import CheckpointCollector, RequestCountCollector, SnapshotsOffCollector  # noqa: PLC0415
    from agent.observe.http import HealthServer, loop_liveness  # noqa: PLC0415
    from agent.observe.metrics import AgentMetrics  # noqa: PLC0415
    from agent.worker.protocol import OFF_FILE  # noqa: PLC0415
    from rendezvous.errors import RendezvousError, StoreConfigError, StoreUnavailableError  # noqa: PLC0415

    signals = Signals()
    signals.install()  # from here on a SIGTERM is a request to leave, not a crash
    server = None
    if config.standalone:
        from rendezvous.etcd.server import EtcdServer  # noqa: PLC0415

        try:
            # Auto-compaction: the agents write a record per node every minute; keep history bounded.
            server = EtcdServer(extra_args=EMBEDDED_ETCD_ARGS).start()
        except RendezvousError as exc:
            raise ConfigError(f"--standalone: could not start the embedded etcd: {exc}") from exc
        log.info("standalone: embedded etcd on %s (data in %s, removed at exit)", server.endpoint, server.data_dir)
        endpoints = server.endpoint
    else:
        endpoints = config.endpoints_text
    # Requests retry for at most a quarter of the lease TTL, so the loop is never blocked on
    # etcd long enough to miss fencing (see rendezvous.protocol.session's margin).
    store = open_store(config, endpoints, retry_for=min(5.0, max(0.5, config.lease_ttl / 4)))
    http = None
    watcher = None
    try:
        metrics = AgentMetrics(config.job_id, config.node_id, min_nodes=config.min_nodes,
                               max_nodes=config.max_nodes, max_restarts=config.max_restarts)
        metrics.registry.register(RequestCountCollector(store.requests, metrics.labels))
        checkpoints = CheckpointCollector(config.checkpoint_dir, metrics.labels)
        metrics.registry.register(checkpoints)
        node_snapshots = snapshots_of(config.job_id, config.log_dir) / config.node_id
        metrics.registry.register(SnapshotsOffCollector(lambda: node_snapshots / OFF_FILE, metrics.labels))
        store.observer = metrics.etcd_request
        try:
            agent = Agent(config, store, metrics=metrics, signals=signals, checkpoints=checkpoints)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            http = HealthServer(
                config.metrics_addr, config.metrics_port, metrics.registry,
                live=loop_liveness(lambda: agent.heartbeat, limit=max(30.0, 3 * config.lease_ttl)),
                ready=lambda: _ready(agent),
            ).start()
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port ({config.metrics_port}) on --metrics-addr ({config.metrics_addr}): "
                f"cannot listen: {exc.strerror or exc}"
            ) from exc
        log.info("metrics and health on http://%s:%d/metrics (/livez, /readyz)", config.metrics_addr, http.port)
        watcher = _watch_preemption(config.preemption_source, signals)
        try:
            return agent.run()
        except StoreConfigError as exc:  # TLS, login or permission refused: fix the settings
            raise usage_error(exc) from exc
        except StoreUnavailableError as exc:  # an operational problem, not a usage error: exit 1
            log.error("%s", exc)
            return EXIT_FAILED
        except (AgentError, RendezvousError) as exc:
            log.error("%s", exc)
            return getattr(exc, "exit_code", EXIT_FAILED)
    finally:
        if watcher is not None:
            watcher.stop()
        if http is not None:
            http.stop()
        store.close()
        if server is not None:
            server.stop()


def _watch_preemption(kind: str, signals: object) -> object:
    """Poll the cloud's metadata for a preemption notice; a notice starts a graceful leave."""
    if kind == "none":
        return None
    from agent.daemon.preemption import PreemptionWatcher, make_source  # noqa: PLC0415

    try:
        source = make_source(kind)
    except ValueError as exc:
        raise ConfigError(f"--preemption-source ({kind}): {exc}") from exc
    if source is None:
        return None
    return PreemptionWatcher(
        source, lambda notice: signals.request(f"preemption notice: {notice.detail}", notice.deadline)  # type: ignore[attr-defined]
    ).start()


def _ready(agent: Agent) -> tuple[bool, str]:
    state = agent.state
    running = agent.local.running  # not getattr: a renamed attribute must fail loudly, never read as "not ready"
    if state == State.RUNNING and running is not None:
        return True, f"ready: running round {running.assignment.round}"
    return False, f"not ready: {state}"


def _setup_logging(level: str, node_id: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s [elastic-agent {node_id}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )



def _status(argv: list[str]) -> int:
    from agent.daemon.config.options import RaisingParser  # noqa: PLC0415
    from agent.daemon.connection import connect  # noqa: PLC0415
    from agent.observe.status import render, snapshot  # noqa: PLC0415
    from rendezvous.errors import RendezvousError, StoreConfigError, StoreUnavailableError  # noqa: PLC0415
    from rendezvous.net import parse_endpoints  # noqa: PLC0415

    parser = RaisingParser(prog="elastic-agent status", description="Show a job as etcd sees it.")
    parser.add_argument("--etcd-endpoints", required=True, help="host:port[,host:port...]; https:// for TLS")
    parser.add_argument("--job-id", required=True, help="the job's id, as given to elastic-agent start")
    parser.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    parser.add_argument("--timeout", type=float, default=3.0,
                        help="seconds to keep trying an unreachable etcd (default 3)")
    connect.add_flags(parser)
    args = parser.parse_args(argv)
    try:
        parse_endpoints(args.etcd_endpoints)
    except ValueError as exc:
        raise ConfigError(f"--etcd-endpoints ({args.etcd_endpoints!r}): {exc}") from exc
    store = connect.status_store(args, os.environ, retry_for=max(0.1, args.timeout),
                                 request_timeout=min(2.0, max(0.1, args.timeout)))
    try:
        snap = snapshot(store, args.job_id)
    except StoreConfigError as exc:
        raise connect.usage_error(exc) from exc
    except StoreUnavailableError as exc:
        raise ConfigError(f"--etcd-endpoints ({args.etcd_endpoints}): {exc}") from exc
    except RendezvousError as exc:
        print(f"elastic-agent: error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(json.dumps(snap, indent=2) if args.json else render(snap))
    return 0


if __name__ == "__main__":
    sys.exit(main())
