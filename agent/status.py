"""``elastic-agent status``: the job as etcd sees it, for a person or (``--json``) a script."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.errors import EXIT_USAGE, ConfigError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise ConfigError(message)


def snapshot(store: Any, job_id: str) -> dict[str, Any]:
    """Everything ``status`` shows, read in a few requests."""
    from rendezvous.settings import Settings  # noqa: PLC0415
    from rendezvous.state import JobStatus, NodeRecord, RestartCount, RoundState  # noqa: PLC0415

    s = Settings(job_id=job_id, min_nodes=1, max_nodes=1)
    result = store.commit([], [], reads=(s.round_key, s.status_key, s.restarts_key))
    round_kv, status_kv, restarts_kv = result.reads
    nodes, _ = store.get_prefix(s.nodes_prefix)
    if round_kv is None and not nodes and status_kv is None:
        raise ConfigError(f"--job-id ({job_id!r}): no such job in etcd (nothing under {s.root})")
    rnd = RoundState.decode(round_kv.key, round_kv.value) if round_kv else None
    status = JobStatus.decode(status_kv.key, status_kv.value) if status_kv else None
    restarts = RestartCount.decode(restarts_kv.key, restarts_kv.value) if restarts_kv else RestartCount(0)
    records = [NodeRecord.decode(kv.key, kv.value) for kv in nodes]
    members = rnd.assignment.node_ids if rnd and rnd.assignment else ()
    return {
        "job_id": job_id,
        "outcome": status.outcome if status else None,
        "outcome_reason": status.reason if status else None,
        "round": rnd.number if rnd else None,
        "round_state": rnd.state if rnd else None,
        "round_reason": rnd.reason if rnd else None,
        "members": [
            {"node_id": m.node_id, "group_rank": i, "addr": m.addr, "nproc": m.nproc,
             "alive": any(r.node_id == m.node_id for r in records)}
            for i, m in enumerate(rnd.assignment.members if rnd and rnd.assignment else ())
        ],
        "standbys": [r.node_id for r in records if r.node_id not in members],
        "world_size": rnd.assignment.world_size if rnd and rnd.assignment else 0,
        "restarts_used": restarts.count,
        "last_restart_reason": restarts.last_reason,
    }


def render(snap: dict[str, Any]) -> str:
    lines = [f"job {snap['job_id']}: " + (
        f"{snap['outcome']} ({snap['outcome_reason']})" if snap["outcome"]
        else f"round {snap['round']} {snap['round_state']} ({snap['round_reason']})")]
    lines.append(f"world size: {len(snap['members'])} nodes, {snap['world_size']} workers")
    for m in snap["members"]:
        lines.append(f"  rank {m['group_rank']:>3}  {m['node_id']:<32} {m['addr']:<20} "
                     f"nproc {m['nproc']}  {'alive' if m['alive'] else 'LOST'}")
    if snap["standbys"]:
        lines.append("standbys: " + ", ".join(snap["standbys"]))
    lines.append(f"restarts used: {snap['restarts_used']}" +
                 (f" (last: {snap['last_restart_reason']})" if snap["last_restart_reason"] else ""))
    return "\n".join(lines)


def run_status(argv: list[str]) -> int:
    from rendezvous.errors import RendezvousError, StoreUnavailableError  # noqa: PLC0415
    from rendezvous.etcd_store import EtcdStore, parse_endpoints  # noqa: PLC0415

    parser = _Parser(prog="elastic-agent status", description="Show a job as etcd sees it.")
    parser.add_argument("--etcd-endpoints", required=True, help="host:port[,host:port...]")
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    args = parser.parse_args(argv)
    try:
        endpoints = parse_endpoints(args.etcd_endpoints)
    except ValueError as exc:
        raise ConfigError(f"--etcd-endpoints ({args.etcd_endpoints!r}): {exc}") from exc
    store = EtcdStore(endpoints, retry_for=3.0)
    try:
        snap = snapshot(store, args.job_id)
    except StoreUnavailableError as exc:
        raise ConfigError(f"--etcd-endpoints ({args.etcd_endpoints}): {exc}") from exc
    except RendezvousError as exc:
        print(f"elastic-agent: error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(json.dumps(snap, indent=2) if args.json else render(snap))
    return 0
