"""agent.daemon.workers.group with real processes: env, logs, console prefixes, stop escalation, children."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon.workers.group import WorkerGroup, error_file_path, stderr_path, stdout_path
from agent.errors import SpawnError
from tests.waiting import alive, wait_until

BIN = Path(__file__).resolve().parents[1] / "bin"
DEADLINE_S = 10.0






def file_text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.fixture
def groups() -> Iterator[list[WorkerGroup]]:
    """Groups made by a test; stopped at the end whatever happened."""
    made: list[WorkerGroup] = []
    yield made
    for group in made:
        group.stop(timeout=0.5)


def make_group(
    groups: list[WorkerGroup], script: str, tmp_path: Path, count: int = 1, args: list[str] | None = None
) -> tuple[WorkerGroup, io.StringIO]:
    console = io.StringIO()
    envs = []
    for rank in range(count):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            TORCHELASTIC_ERROR_FILE=str(error_file_path(tmp_path, rank)),
            ELASTIC_AGENT_NODE_ID="node-a",
        )
        envs.append(env)
    group = WorkerGroup(
        [sys.executable, str(BIN / script), *(args or [])],
        envs,
        tmp_path,
        [f"node-a/{rank}" for rank in range(count)],
        console=console,
    )
    groups.append(group)
    return group, console


def wait_exit(group: WorkerGroup) -> list[int | None]:
    return wait_until(lambda: None not in (codes := group.poll()) and codes, DEADLINE_S, "workers to exit")  # type: ignore[return-value]


def test_workers_get_their_env_logs_and_prefixed_console(groups: list[WorkerGroup], tmp_path: Path) -> None:
    group, console = make_group(groups, "print_env.py", tmp_path, count=2)
    group.start()
    assert len(group.pids) == 2
    assert wait_exit(group) == [0, 0]
    group.stop(timeout=1.0)  # drains output readers

    for rank in (0, 1):
        seen = json.loads(stdout_path(tmp_path, rank).read_text())
        assert seen["RANK"] == str(rank)
        assert seen["LOCAL_RANK"] == str(rank)
        assert seen["TORCHELASTIC_ERROR_FILE"] == str(tmp_path / str(rank) / "error.json")
        assert seen["ELASTIC_AGENT_NODE_ID"] == "node-a"
        assert stderr_path(tmp_path, rank).read_text() == f"stderr from rank {rank}\n"

    lines = console.getvalue().splitlines()
    for rank in (0, 1):
        assert f"[node-a/{rank}] stderr from rank {rank}" in lines
        assert any(line.startswith(f'[node-a/{rank}] {{"RANK": "{rank}"') for line in lines)
    assert len(lines) == 4


def test_stop_escalates_to_sigkill_for_a_worker_ignoring_sigterm(groups: list[WorkerGroup], tmp_path: Path) -> None:
    group, _ = make_group(groups, "ignore_sigterm.py", tmp_path)
    group.start()
    wait_until(lambda: "ready" in file_text(stdout_path(tmp_path, 0)), DEADLINE_S, "the worker to ignore SIGTERM")

    started = time.monotonic()
    group.stop(timeout=0.3)
    elapsed = time.monotonic() - started

    assert group.poll() == [-9]
    assert 0.3 <= elapsed < 5.0
    assert "killed by SIGKILL" in group.failure_summary(0)
    group.stop(timeout=0.3)  # idempotent
    assert group.poll() == [-9]


def test_stop_kills_the_workers_children(groups: list[WorkerGroup], tmp_path: Path) -> None:
    group, _ = make_group(groups, "spawn_child.py", tmp_path)
    group.start()
    line = wait_until(lambda: file_text(stdout_path(tmp_path, 0)).strip(), DEADLINE_S, "the child's pid")
    child_pid = int(str(line).split()[1])
    assert alive(child_pid)

    group.stop(timeout=0.3)

    assert group.poll() == [-15]  # the worker itself obeyed SIGTERM
    wait_until(lambda: not alive(child_pid), DEADLINE_S, f"child {child_pid} to die")


def test_stop_kills_children_left_behind_by_an_exited_worker(groups: list[WorkerGroup], tmp_path: Path) -> None:
    group, _ = make_group(groups, "spawn_child.py", tmp_path, args=["--exit"])
    group.start()
    assert wait_exit(group) == [0]
    line = wait_until(lambda: file_text(stdout_path(tmp_path, 0)).strip(), DEADLINE_S, "the child's pid")
    child_pid = int(str(line).split()[1])
    assert alive(child_pid)

    group.stop(timeout=0.3)

    wait_until(lambda: not alive(child_pid), DEADLINE_S, f"orphaned child {child_pid} to die")


def test_failure_summary_names_the_exception_from_stderr(groups: list[WorkerGroup], tmp_path: Path) -> None:
    group, console = make_group(groups, "raise_error.py", tmp_path)
    group.start()
    assert wait_exit(group) == [1]
    summary = group.failure_summary(0)
    assert summary == f"local rank 0 (pid {group.pids[0]}) exited with code 1: ValueError: boom at step 42"
    assert group.stderr_tail(0)[-1] == "ValueError: boom at step 42"
    assert "[node-a/0] ValueError: boom at step 42" in console.getvalue()


def test_failure_summary_prefers_the_error_file(groups: list[WorkerGroup], tmp_path: Path) -> None:
    group, _ = make_group(groups, "raise_error.py", tmp_path, args=["--error-file"])
    group.start()
    assert wait_exit(group) == [1]
    assert error_file_path(tmp_path, 0).exists()
    assert group.failure_summary(0).endswith("exited with code 1: ValueError: boom at step 42")


def test_a_rerun_in_the_same_log_dir_appends_and_reports_only_its_own_run(
    groups: list[WorkerGroup], tmp_path: Path
) -> None:
    first, _ = make_group(groups, "raise_error.py", tmp_path, args=["--error-file"])
    first.start()
    wait_exit(first)
    first.stop(timeout=0.5)

    second, _ = make_group(groups, "print_env.py", tmp_path)
    second.start()
    assert wait_exit(second) == [0]
    assert not error_file_path(tmp_path, 0).exists()  # the stale one was removed at start
    assert second.stderr_tail(0) == ["stderr from rank 0"]
    assert "ValueError: boom at step 42" in stderr_path(tmp_path, 0).read_text()  # history kept


def test_unstartable_command_is_a_spawn_error(tmp_path: Path) -> None:
    group = WorkerGroup(["/nonexistent/train"], [dict(os.environ)], tmp_path, ["n/0"], console=io.StringIO())
    with pytest.raises(SpawnError, match=r"^worker command '/nonexistent/train' not found or not executable$"):
        group.start()
    group.stop(timeout=0.1)
