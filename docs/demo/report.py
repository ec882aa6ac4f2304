"""The end of the demo: a short summary and a picture of step against time (text, and a PNG
when matplotlib is installed and ``--png`` asks for one)."""

from __future__ import annotations

from pathlib import Path

from docs.demo.nodes import Job, Mark
from docs.demo.scenario import Result

EVENT_MARK = {"kill -9": "K", "preemption": "P", "join": "J"}


def summary(job: Job, result: Result, steps: list[Mark]) -> list[str]:
    r = result
    last = max((s.value for s in steps), default=-1)
    etcd = r.status or {}
    done = f"{last + 1} of {job.steps} steps done (last step {last})" if last >= 0 else "no step done"
    lines = ["summary",
             f"  steps: {done}; job {etcd.get('state', 'succeeded')} (elastic-agent status)",
             f"  time: {r.end_t - r.t0:.1f} s in all; first step {r.first_step_t - r.t0:.1f} s after start"]
    reasons: dict[str, int] = {}
    for got in r.scrapes.values():  # every member counts the same restart: the job's count is the max
        for reason, count in got.restarts.items():
            reasons[reason] = max(reasons.get(reason, 0), count)
    listed = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none"
    lines.append(f"  restarts by reason (elastic_agent_worker_group_restarts_total): {listed}")
    lines.append("  seconds lost per event (kill -9: until past the step reached before; preemption: the drain;")
    lines.append("  join: from the leave until training again):")
    for e in r.events:
        lines.append(f"    {e.name:<11} {e.node:<7} {e.lost_s:5.1f} s  {e.detail}")
    if etcd.get("goodput_ratio") is not None:
        bad = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(etcd.get("badput_node_seconds", {}).items()) if v >= 0.5)
        lines.append(f"  goodput: {etcd['goodput_ratio']:.1%} of {etcd['elapsed_node_seconds']:.0f} node-seconds "
                     f"at the end (elastic-agent status); badput: {bad or 'none'}")
    # Served by the group-rank-0 agent: the one that was rank 0 when the job ended.
    serving = sorted(((r.exit_codes.get(n) != 0, s.group_rank != 0, n, s.job_goodput)
                      for n, s in r.scrapes.items() if s.job_goodput is not None))
    if serving:
        *_, node, ratio = serving[0]
        lines.append(f"  goodput: job {ratio:.1%} as last scraped (elastic_agent_job_goodput_ratio of {node}, "
                     "updated at state changes)")
    per_node = ", ".join(f"{n} {s.goodput:.0%}" for n, s in sorted(r.scrapes.items()) if s.goodput is not None)
    if per_node:
        lines.append(f"  goodput per node (elastic_agent_goodput_ratio): {per_node}")
    lines.append("  (a one-minute job: starting 3 agents and importing torch is most of its badput)")
    return lines


def text_chart(result: Result, steps: list[Mark], total: int, width: int = 64, height: int = 12) -> list[str]:
    """Step against time; each point is drawn as the world size it trained at."""
    if not steps:
        return ["(no steps to draw)"]
    t0 = result.t0
    span = max(1e-6, max(result.end_t, steps[-1].t) - t0)
    top = max(total - 1, 1)
    grid = [[" "] * width for _ in range(height)]
    for s in steps:
        col = min(width - 1, int((s.t - t0) / span * (width - 1)))
        row = height - 1 - min(height - 1, int(s.value / top * (height - 1)))
        grid[row][col] = str(s.world) if s.world < 10 else "+"
    marks = [" "] * width
    for e in result.events:
        col = min(width - 1, max(0, int((e.at - t0) / span * (width - 1))))
        marks[col] = EVENT_MARK.get(e.name, "*")
    label = {0: f"{top:>5}", height // 2: f"{top // 2:>5}", height - 1: f"{0:>5}"}
    lines = ["step against time (each point is the world size it trained at)", "  step"]
    for i, row in enumerate(grid):
        lines.append(f"{label.get(i, '     ')} |" + "".join(row))
    lines.append("      +" + "-" * width)
    lines.append("       " + "".join(marks))
    end = f"{span:.0f} s"
    lines.append("       0 s" + end.rjust(width - 3))
    lines.append("       K kill -9   P preemption (SIGTERM)   J join")
    return lines


def png_chart(result: Result, steps: list[Mark], path: Path) -> str:
    try:
        import matplotlib  # noqa: PLC0415 - optional

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "no PNG: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for world in sorted({s.world for s in steps}):
        points = [s for s in steps if s.world == world]
        ax.scatter([s.t - result.t0 for s in points], [s.value for s in points], s=6, label=f"world size {world}")
    for e in result.events:
        ax.axvline(e.at - result.t0, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(f"{e.name} {e.node}", (e.at - result.t0, ax.get_ylim()[1]), rotation=90, va="top", ha="right",
                    fontsize=8)
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("step")
    ax.set_title("elastic-agent demo: step against time")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"chart written to {path}"
