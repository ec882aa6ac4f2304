"""Worker output with real processes: what --redirects, --tee, --local-ranks-filter and the line
prefix send to the agent's console (stdout to stdout, stderr to stderr), that the log files
always get everything, that pre-started workers honour the same settings, and --local-rank-arg."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.daemon.config.console import ConsoleSettings, local_ranks, per_rank_streams
from agent.daemon.workers.group import WorkerGroup, stderr_path, stdout_path
from agent.daemon.workers.prewarm import WarmWorker
from agent.daemon.workers.spawn import with_local_rank_arg
from tests.waiting import wait_until

SCRIPT = str(Path(__file__).resolve().parents[1] / "bin" / "show_invocation.py")  # argv JSON out, a line err
ROOT = Path(__file__).resolve().parents[2]


def run_group(tmp_path: Path, settings: ConsoleSettings, *, nproc: int = 2, warm: bool = False,
              local_rank_arg: bool = False) -> tuple[str, str]:
    """Run show_invocation.py as ``nproc`` workers (global ranks 10, 11, ...) to the end; the
    console's stdout and stderr."""
    command = [sys.executable, SCRIPT, "--flag", "x"]
    command = with_local_rank_arg(command) if local_rank_arg else command
    envs = [{**os.environ, "RANK": str(10 + r), "LOCAL_RANK": str(r)} for r in range(nproc)]
    routes = [settings.route(local_rank=r, rank=10 + r, node_id="node-a") for r in range(nproc)]
    pool = [WarmWorker(sys.executable, dict(os.environ)) for _ in range(nproc)] if warm else []
    out, err = io.StringIO(), io.StringIO()
    group = WorkerGroup(command, envs, tmp_path, routes, console=out, warm=pool, err_console=err)
    try:
        group.start()
        wait_until(lambda: None not in group.poll(), 60, "the workers to exit")
    finally:
        group.stop(timeout=1.0)  # drains the output readers
    assert group.poll() == [0] * nproc
    return out.getvalue(), err.getvalue()


def argv_of(tmp_path: Path, local_rank: int) -> list[str]:
    return json.loads(stdout_path(tmp_path, local_rank).read_text().splitlines()[0])["argv"]


def test_by_default_both_streams_of_every_rank_reach_the_console_with_todays_prefix(tmp_path) -> None:
    out, err = run_group(tmp_path, ConsoleSettings())
    assert sorted(line.split(" ", 1)[0] for line in out.splitlines()) == ["[node-a/10]", "[node-a/11]"]
    assert sorted(err.splitlines()) == ["[node-a/10] to stderr", "[node-a/11] to stderr"]


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "prewarmed"])
def test_redirects_tee_filter_and_template_route_each_stream(tmp_path, warm) -> None:
    # rank 0: stdout redirected (file only); rank 1: both redirected, stderr tee'd back.
    settings = ConsoleSettings(per_rank_streams("0:1,1:3"), per_rank_streams("1:2"), None,
                               "<${role_name}${local_rank} ${rank}@${node_id}> ")
    out, err = run_group(tmp_path, settings, warm=warm)
    assert out == ""
    assert sorted(err.splitlines()) == ["<default0 10@node-a> to stderr", "<default1 11@node-a> to stderr"]
    for rank in (0, 1):  # the log files always get everything, without the prefix
        assert json.loads(stdout_path(tmp_path, rank).read_text())["rank"] == str(10 + rank)
        assert stderr_path(tmp_path, rank).read_text() == "to stderr\n"
        assert json.loads(stdout_path(tmp_path, rank).read_text())["torch_loaded"] is warm


def test_local_ranks_filter_and_no_prefix(tmp_path) -> None:
    out, err = run_group(tmp_path, ConsoleSettings(local_ranks_filter=local_ranks("1"), template=""), nproc=3)
    assert [json.loads(line)["rank"] for line in out.splitlines()] == ["11"]  # unprefixed: plain JSON
    assert err == "to stderr\n"
    assert all(stdout_path(tmp_path, r).read_text() for r in range(3))


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "prewarmed"])
def test_local_rank_arg_reaches_each_worker(tmp_path, warm) -> None:
    run_group(tmp_path, ConsoleSettings(), warm=warm, local_rank_arg=True)
    for rank in (0, 1):
        assert argv_of(tmp_path, rank) == [SCRIPT, f"--local-rank={rank}", "--flag", "x"]


def agent(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "agent", "start", "--standalone", "--nproc-per-node", "2", "--metrics-port",
               "0", "--node-id", "n1", "--log-dir", str(tmp_path / "logs"), *flags, "--", sys.executable, SCRIPT]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


def test_the_agent_applies_the_flags_to_its_workers(tmp_path) -> None:
    proc = agent(tmp_path, "--redirects", "3", "--tee", "1:2", "--local-rank-arg",
                 "--log-line-prefix-template", "<${role_name}${local_rank}:${rank}@${node_id}> ")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"argv"' not in proc.stdout  # every stdout redirected
    shown = [line for line in proc.stderr.splitlines() if "to stderr" in line]
    assert shown == ["<default1:1@n1> to stderr"], proc.stderr[-3000:]
    logs = sorted((tmp_path / "logs").glob("standalone/n1/*/*/stdout.log"))
    assert [json.loads(p.read_text())["argv"][1] for p in logs] == ["--local-rank=0", "--local-rank=1"]


def test_the_agent_filters_ranks_and_drops_the_prefix(tmp_path) -> None:
    proc = agent(tmp_path, "--local-ranks-filter", "1", "--no-log-line-prefix")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["rank"] for line in proc.stdout.splitlines() if '"argv"' in line] == ["1"]
    assert [line for line in proc.stderr.splitlines() if "to stderr" in line] == ["to stderr"]


def test_a_bad_value_is_one_line_and_exit_2(tmp_path) -> None:
    proc = agent(tmp_path, "--tee", "3:9")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "--tee ('3:9') must be 0 (none), 1 (stdout), 2 (stderr) or 3 (both), or per local rank "
        "LOCAL_RANK:N[,LOCAL_RANK:N...] (e.g. 0:1,1:2)")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
