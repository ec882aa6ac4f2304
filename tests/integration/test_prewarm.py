"""Pre-started ("warm") workers: a worker adopted from the pool must behave exactly like one
started cold with ``python SCRIPT ARGS`` (argv, __main__, sys.path[0], env, logs, exit code)."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import pytest

from agent.daemon.workers.group import WorkerGroup, stderr_path, stdout_path
from agent.daemon.workers.prewarm import WarmWorker, prewarmable

SCRIPT = str(Path(__file__).resolve().parents[1] / "bin" / "show_invocation.py")


@pytest.mark.parametrize(("command", "ok"), [
    (["python", "train.py", "--lr", "1"], True),
    (["/usr/bin/python3.11", "train.py"], True),
    (["python", "-m", "pkg.train"], True),
    (["python", "-u", "train.py"], False),
    (["python", "-m"], False),
    (["bash", "run.sh"], False),
    (["torchrun", "train.py"], False),
    (["python"], False),
])
def test_only_plain_python_commands_are_prewarmed(command, ok):
    assert prewarmable(command) is ok


def _run(tmp_path: Path, warm: bool, exit_with: str = "0") -> tuple[dict, str, int]:
    command = [sys.executable, SCRIPT, "--flag", "value"]
    env = {**os.environ, "RANK": "7", "EXIT_WITH": exit_with}
    pool = [WarmWorker(sys.executable, dict(os.environ))] if warm else []
    console = io.StringIO()
    group = WorkerGroup(command, [env], tmp_path, ["node/7"], console=console, warm=pool)
    group.start()
    deadline = time.monotonic() + 60
    while group.poll()[0] is None:
        assert time.monotonic() < deadline, "worker did not finish"
        time.sleep(0.05)
    group.stop(5)
    out = json.loads(stdout_path(tmp_path, 0).read_text().splitlines()[0])
    return out, stderr_path(tmp_path, 0).read_text() + console.getvalue(), group.poll()[0]


@pytest.mark.parametrize("exit_with", ["0", "3"])
def test_a_warm_worker_runs_the_script_as_a_cold_one_would(tmp_path, exit_with):
    cold, cold_text, cold_code = _run(tmp_path / "cold", warm=False, exit_with=exit_with)
    warm, warm_text, warm_code = _run(tmp_path / "warm", warm=True, exit_with=exit_with)
    assert warm_code == cold_code == int(exit_with)
    for key in ("argv", "name", "path0", "cwd", "rank"):
        assert warm[key] == cold[key], key
    assert warm["name"] == "__main__" and warm["argv"] == [SCRIPT, "--flag", "value"]
    assert warm["torch_loaded"] is True  # the point: torch was imported before the round
    assert "to stderr" in warm_text and "[node/7] to stderr" in warm_text


def test_every_warm_worker_of_a_node_is_forked_from_one_zygote(tmp_path):
    from agent.daemon.workers.keeper import shared_keeper

    out, _text, code = _run(tmp_path / "a", warm=True, exit_with="0")
    zygote = shared_keeper()
    again, _text, _code = _run(tmp_path / "b", warm=True, exit_with="0")
    assert code == 0 and out["torch_loaded"] and again["torch_loaded"]
    assert shared_keeper() is zygote and zygote.zygote is not None  # one interpreter, kept across rounds
    assert out["ppid"] == again["ppid"] == zygote.process.pid


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _forked(pid: int, keeper: object) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2:].split()[1]) == keeper.process.pid  # type: ignore[attr-defined]


def _pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise AssertionError(f"no Pss for {pid}")


def test_the_zygote_is_given_up_and_brought_back_in_place_while_its_workers_run(tmp_path):
    """In-process recovery keeps its workers across job changes, so the agent gives the
    pre-started interpreter up (its memory is the node's overhead) and brings it back when
    new workers may be needed. The keeper changes program in place: the workers below it
    (children of that very pid, killed if it died) keep running."""
    from agent.daemon.workers.keeper import retire_zygote, shared_keeper, zygote_running

    warm = WarmWorker(sys.executable, dict(os.environ))
    keeper = shared_keeper()
    script = tmp_path / "sleep.py"
    script.write_text("import time\ntime.sleep(60)\n")
    sleeper = [sys.executable, str(script)]
    group = WorkerGroup(sleeper, [dict(os.environ)], tmp_path / "g", ["node/0"], console=io.StringIO(), warm=[warm])
    group.start()
    try:
        assert _forked(group.pids[0], keeper)
        zygote_pss = _pss_kib(keeper.process.pid)
        retire_zygote()
        wait = time.monotonic() + 30
        while "--preload" in _cmdline(keeper.process.pid):
            assert time.monotonic() < wait, "the keeper did not leave the zygote"
            time.sleep(0.05)
        assert not zygote_running() and shared_keeper() is keeper and keeper.alive
        assert group.poll() == [None], "a worker died when its zygote was given up"
        assert _pss_kib(keeper.process.pid) < zygote_pss / 4  # torch is no longer held beside the workers

        again, _text, code = _run(tmp_path / "again", warm=True)  # brought back: forked from it again
        assert code == 0 and again["torch_loaded"] and again["ppid"] == keeper.process.pid
        assert shared_keeper() is keeper and group.poll() == [None]
    finally:
        group.stop(5)


def test_a_warm_worker_survives_the_ddp_tutorials_ending_every_time(tmp_path):
    # Without the zygote's guard (keeper_main.let_gloo_settle_before_destroy) a worker forked
    # from it deadlocks in this ending about once in 80; 200 endings hang it almost surely.
    script = str(Path(__file__).resolve().parents[1] / "bin" / "ddp_destroy_repeatedly.py")
    group = WorkerGroup([sys.executable, script, "200"], [dict(os.environ)], tmp_path, ["node/0"],
                        console=io.StringIO(), warm=[WarmWorker(sys.executable, dict(os.environ))])
    group.start()
    try:
        deadline = time.monotonic() + 90
        while group.poll()[0] is None:
            assert time.monotonic() < deadline, "the worker hung in a DDP ending"
            time.sleep(0.05)
    finally:
        group.stop(1)
    assert group.poll()[0] == 0, stderr_path(tmp_path, 0).read_text()[-2000:]
    assert stdout_path(tmp_path, 0).read_text().strip() == "survived 200"
