"""``elastic-agent status``: the job as etcd sees it, for a person or (``--json``) a script.

Read in three requests: one transaction for ``round``, ``status`` and ``restarts``, and one
range each for the live nodes and the agents' goodput records (agent.goodput). What etcd
does not hold is not shown: etcd keeps no timestamps, so a node's "last report" age comes
from the wall clock its agent wrote into its goodput record (on state changes and every ~60 s), and the restart
budget from the agents' records (``max_restarts``), the only place it is stored.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from agent.errors import ConfigError


def snapshot(store: Any, job_id: str, *, now: float | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (the ``--json`` output)."""
    from agent.observe import goodput  # noqa: PLC0415
    from rendezvous.protocol import round_members  # noqa: PLC0415
    from rendezvous.settings import Settings  # noqa: PLC0415
    from rendezvous.state import JobStatus, NodeRecord, RestartCount  # noqa: PLC0415

    now = time.time() if now is None else now
    try:
        s = Settings(job_id=job_id, min_nodes=1, max_nodes=1)
    except ValueError as exc:
        raise ConfigError(f"--job-id ({job_id!r}): {exc}") from exc
    result = store.commit([], [], reads=(s.round_key, s.status_key, s.restarts_key))
    round_kv, status_kv, restarts_kv = result.reads
    nodes, revision = store.get_prefix(s.nodes_prefix)
    reports = goodput.load(store, s)
    network = _network(store, s)
    if round_kv is None and not nodes and status_kv is None and not reports:
        raise ConfigError(f"--job-id ({job_id!r}): no such job in etcd (nothing under {s.root})")
    rnd = round_members.load(store, s, round_kv)[0] if round_kv else None
    if rnd is not None and rnd.is_open:  # who was in the last round: not on the round record
        rnd = replace(rnd, previous=round_members.previous(store, s, rnd.number))
    status = JobStatus.decode(status_kv.key, status_kv.value) if status_kv else None
    restarts = RestartCount.decode(restarts_kv.key, restarts_kv.value) if restarts_kv else RestartCount(0)
    records = {NodeRecord.decode(kv.key, kv.value).node_id: kv for kv in nodes}
    assignment = rnd.assignment if rnd else None
    members_src = [(m.node_id, m.addr, m.nproc) for m in assignment.members] if assignment else []
    member_ids = {m[0] for m in members_src}

    def node_view(node_id: str) -> dict[str, Any]:
        report = reports.get(node_id)
        kv = records.get(node_id)
        return {
            "alive": kv is not None,
            # Revisions since the node registered: etcd's only clock, shown for ordering.
            "registered_revisions_ago": (revision - kv.create_revision) if kv is not None else None,
            "agent_state": report.state if report else None,
            "last_report_age_seconds": round(now - report.time, 1) if report and report.time else None,
            "last_step": report.last_step if report else None,
        }

    budgets = [r.max_restarts for r in sorted(reports.values(), key=lambda r: r.time) if r.max_restarts is not None]
    max_restarts = budgets[-1] if budgets else None
    steps = [r.last_step for r in reports.values() if r.last_step is not None]
    step_times = [r.last_step_time for r in reports.values() if r.last_step_time is not None]
    ckpts = [r for r in reports.values() if r.checkpoint_step is not None]
    latest_ckpt = max(ckpts, key=lambda r: (r.checkpoint_step, r.checkpoint_time or 0.0)) if ckpts else None
    totals = goodput.job_totals(reports)
    return {
        "job_id": job_id,
        "state": _job_state(status, rnd),
        "outcome": status.outcome if status else None,
        "outcome_reason": status.reason if status else None,
        "round": rnd.number if rnd else None,
        "round_state": rnd.state if rnd else None,
        "round_reason": rnd.reason if rnd else None,
        "members": [
            {"node_id": node_id, "group_rank": i, "addr": addr, "nproc": nproc, **node_view(node_id)}
            for i, (node_id, addr, nproc) in enumerate(members_src)
        ],
        "previous_members": list(rnd.previous) if rnd and rnd.is_open else [],
        "standbys": [{"node_id": n, **node_view(n)} for n in sorted(records) if n not in member_ids],
        "world_size_nodes": len(members_src),
        "world_size": assignment.world_size if assignment else 0,
        "restarts_used": restarts.count,
        "max_restarts": max_restarts,
        "restarts_left": None if max_restarts is None else max(0, max_restarts - restarts.count),
        "last_restart_reason": restarts.last_reason,
        "last_step": max(steps) if steps else None,
        "last_step_age_seconds": round(now - max(step_times), 1) if step_times else None,
        "checkpoint_step": latest_ckpt.checkpoint_step if latest_ckpt else None,
        "checkpoint_age_seconds": (round(now - latest_ckpt.checkpoint_time, 1)
                                   if latest_ckpt and latest_ckpt.checkpoint_time else None),
        "goodput_ratio": round(totals.ratio, 4) if totals.elapsed > 0 else None,
        "elapsed_node_seconds": round(totals.elapsed, 1),
        "badput_node_seconds": {k: round(v, 1) for k, v in totals.badput.items()},
        "revision": revision,
        "network": network,
    }


def _network(store: Any, s: Any) -> list[dict[str, Any]]:
    """The nodes' reachability reports (rendezvous.protocol.reachability.Report): who cannot reach whom
    over the workers' network, and who is kept out for it. An unreadable one is skipped."""
    from rendezvous.protocol.reachability import Report  # noqa: PLC0415

    kvs, _ = store.get_prefix(s.reach_prefix)
    found = [(kv.key[len(s.reach_prefix):], Report.decode(kv.value)) for kv in kvs]
    return [{"node_id": node, "round": r.round, "unreachable": list(r.unreachable), "kept_out": r.kept_out}
            for node, r in sorted(found) if r is not None]


def _job_state(status: Any, rnd: Any) -> str:
    if status is not None:
        return status.outcome
    if rnd is None:
        return "starting"
    return "rendezvous" if rnd.is_open else "running"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


# Text in etcd is written by whoever may write the job's keys: never let it drive the terminal.
_CONTROL = {c: "?" for c in (*range(32), *range(127, 160)) if c != ord("\n")}


def render(snap: dict[str, Any]) -> str:
    """The person's view: a few aligned lines (control characters from etcd shown as ``?``)."""
    head = f"job {snap['job_id']}: {snap['state']}"
    if snap["outcome"]:
        head += f" ({snap['outcome_reason']})"
    elif snap["round"] is not None:
        head += f", round {snap['round']} {snap['round_state']}"
        if snap["round_reason"]:
            head += f" ({snap['round_reason']})"
    lines = [head, f"world size: {snap['world_size_nodes']} nodes, {snap['world_size']} workers"]
    if snap["previous_members"]:
        lines.append("waiting for a round to close; previous members: " + ", ".join(snap["previous_members"]))
    for m in snap["members"]:
        lines.append(
            f"  rank {m['group_rank']:>3}  {m['node_id']:<24} {m['addr']:<16} nproc {m['nproc']:<3} "
            f"{'alive' if m['alive'] else 'LOST ':<5}  {(m['agent_state'] or '-'):<10} "
            f"report {_age(m['last_report_age_seconds'])}"
        )
    if snap["standbys"]:
        lines.append("standbys / waiting: " + ", ".join(
            f"{s['node_id']} ({s['agent_state'] or 'registered'})" for s in snap["standbys"]))
    budget = (f"{snap['restarts_used']} of {snap['max_restarts']} used" if snap["max_restarts"] is not None
              else f"{snap['restarts_used']} used (budget unknown: no agent reported it)")
    lines.append(f"restarts: {budget}" +
                 (f" (last: {snap['last_restart_reason']})" if snap["last_restart_reason"] else ""))
    step = "-" if snap["last_step"] is None else f"{snap['last_step']} ({_age(snap['last_step_age_seconds'])})"
    ckpt = ("-" if snap["checkpoint_step"] is None
            else f"{snap['checkpoint_step']} ({_age(snap['checkpoint_age_seconds'])})")
    lines.append(f"last step: {step}   last checkpoint: {ckpt}")
    for r in snap.get("network", []):
        peers = ", ".join(r["unreachable"])
        lines.append(f"network: {r['node_id']} kept out (unreachable): cannot reach {peers}" if r["kept_out"]
                     else f"network: {r['node_id']} cannot reach {peers} (round {r['round']})")
    if snap["goodput_ratio"] is not None:
        bad = ", ".join(f"{k} {v:.0f}s" for k, v in snap["badput_node_seconds"].items() if v >= 0.5)
        lines.append(f"goodput: {snap['goodput_ratio']:.1%} of {snap['elapsed_node_seconds']:.0f} node-seconds"
                     + (f" (badput: {bad})" if bad else ""))
    return "\n".join(lines).translate(_CONTROL)
