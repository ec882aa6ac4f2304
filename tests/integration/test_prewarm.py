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

from agent.daemon.prewarm import WarmWorker, prewarmable
from agent.daemon.workers import WorkerGroup, stdout_path, stderr_path

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
    from agent.daemon.keeper import shared_keeper

    out, _text, code = _run(tmp_path / "a", warm=True, exit_with="0")
    zygote = shared_keeper()
    again, _text, _code = _run(tmp_path / "b", warm=True, exit_with="0")
    assert code == 0 and out["torch_loaded"] and again["torch_loaded"]
    assert shared_keeper() is zygote and zygote.zygote is not None  # one interpreter, kept across rounds
    assert out["ppid"] == again["ppid"] == zygote.process.pid
