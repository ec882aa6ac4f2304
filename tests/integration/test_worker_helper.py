"""agent.worker with real gloo processes: drain agreement across nodes, periodic checkpoints and
resume, and the example script under plain torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.worker import checkpoint as ckpt
from agent.worker import control
from agent.worker.protocol import (
    CHECKPOINT_DIR_ENV,
    CONTROL_FILE_ENV,
    DRAINED_EXIT_CODE,
    PROGRESS_FILE_ENV,
    ROUND_ENV,
)
from rendezvous.net import free_port
from tests.conftest import torchrun_env
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
LOOP = ROOT / "tests" / "bin" / "elastic_loop.py"
EXAMPLE = ROOT / "docs" / "examples" / "train_ddp.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
DEADLINE_S = 30.0


def read_progress(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait(timeout=10)


def start_ranks(procs: list[subprocess.Popen], tmp_path: Path, args: list[str], *, agent: bool,
                world_size: int = 2, round_number: int = 1, script: Path = LOOP,
                checkpoint_dirs: list[Path] | None = None) -> list[Path]:
    """One process per rank of ``script``, each as if on its own node (own control and progress
    file); every rank's checkpoint directory is ``tmp_path/ckpt`` unless ``checkpoint_dirs`` says."""
    port = free_port()
    outputs = []
    for rank in range(world_size):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_AGENT_")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK="0",
                   WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
        env[CHECKPOINT_DIR_ENV] = str(checkpoint_dirs[rank] if checkpoint_dirs else tmp_path / "ckpt")
        if agent:
            env[ROUND_ENV] = str(round_number)
            env[PROGRESS_FILE_ENV] = str(tmp_path / f"progress-{rank}.json")
            env[CONTROL_FILE_ENV] = str(tmp_path / f"control-{rank}")
        out = tmp_path / f"out-{rank}-{len(procs)}.txt"
        with open(out, "w") as handle:
            procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=tmp_path,
                                          stdout=handle, stderr=subprocess.STDOUT))
        outputs.append(out)
    return outputs


def wait_all(procs: list[subprocess.Popen], outputs: list[Path]) -> list[int]:
    codes = []
    for proc, out in zip(procs, outputs):
        try:
            codes.append(proc.wait(timeout=DEADLINE_S))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pid {proc.pid} still running after {DEADLINE_S}s:\n{out.read_text()}") from None
    return codes


def test_a_stop_step_stops_every_rank_at_exactly_that_step_without_a_collective(procs, tmp_path: Path) -> None:
    outputs = start_ranks(procs, tmp_path, ["100000", "0.05"], agent=True)
    progress = [tmp_path / "progress-0.json", tmp_path / "progress-1.json"]
    wait_until(lambda: all((read_progress(p) or {}).get("step", -1) >= 3 for p in progress), DEADLINE_S, "3 steps on both ranks")

    # Every node's agent learns the same step (through etcd) and writes it to its control file,
    # one node a little later than the other.
    target = max(read_progress(p)["step"] for p in progress) + 8
    control.write(tmp_path / "control-0", control.Control(seq=1, stop_at=target))
    time.sleep(0.1)  # the second agent hears of it 0.1 s later (the scenario, not a wait for anything)
    control.write(tmp_path / "control-1", control.Control(seq=1, stop_at=target))

    codes = wait_all(procs, outputs)
    texts = [out.read_text() for out in outputs]
    assert codes == [DRAINED_EXIT_CODE, DRAINED_EXIT_CODE], texts
    drained = [int(text.split("drained ")[1].split()[0]) for text in texts]
    assert drained == [target, target], texts
    step = drained[0]
    for path in progress:
        record = read_progress(path)
        assert record is not None
        assert (record["v"], record["step"], record["phase"]) == (1, step, "drained")
        assert isinstance(record["time"], float) and record["pid"] in (p.pid for p in procs)
    latest = ckpt.load_latest(tmp_path / "ckpt")
    assert latest is not None and (latest.step, latest.round_number) == (step, 1)
    import torch

    state = torch.load(latest.file("state.pt"))
    assert state["step"] == step
    # sum over steps 0..step of (0 + 1) * s: the all-reduced step numbers of two ranks.
    assert state["sum"].item() == 2 * sum(range(step + 1))


def test_periodic_checkpoints_and_resume_without_the_agent(procs, tmp_path: Path) -> None:
    # Plain torchrun-like env: a checkpoint dir, but no round, progress or control file.
    outputs = start_ranks(procs, tmp_path, ["7", "0", "3"], agent=False)
    assert wait_all(procs, outputs) == [0, 0], [o.read_text() for o in outputs]
    assert "resumed 0" in outputs[0].read_text()
    assert [c.step for c in ckpt.complete_checkpoints(tmp_path / "ckpt")] == [2, 5]
    assert not list(tmp_path.glob("progress-*"))

    first = len(procs)
    outputs = start_ranks(procs, tmp_path, ["9", "0", "3"], agent=False)
    assert wait_all(procs[first:], outputs) == [0, 0], [o.read_text() for o in outputs]
    for out in outputs:
        text = out.read_text()
        assert "resumed 6" in text and "step 5\n" not in text
        assert f"done sum {2 * sum(range(9))}" in text
    # keep_last=2 in the script
    assert [c.step for c in ckpt.complete_checkpoints(tmp_path / "ckpt")] == [5, 8]


def test_a_worker_of_an_older_round_cannot_save(procs, tmp_path: Path) -> None:
    import torch

    # Round 7 already checkpointed step 0; a late worker of round 6 resumes from it, trains
    # step 1 and tries to save it.
    newer = {"sum": torch.zeros(1), "step": 0}
    ckpt.save(tmp_path / "ckpt", 0, {"state.pt": lambda f: torch.save(newer, f)}, round_number=7)
    outputs = start_ranks(procs, tmp_path, ["3", "0", "1"], agent=True, round_number=6)
    codes = wait_all(procs, outputs)
    texts = [out.read_text() for out in outputs]
    assert all(code not in (0, DRAINED_EXIT_CODE) for code in codes), texts
    assert "StaleCheckpointError" in texts[0] and "round 6" in texts[0]
    assert "rank 0 failed to save the checkpoint of step" in texts[1]
    assert "step 1" in texts[0] and "step 2" not in texts[0]
    assert ckpt.latest_step(tmp_path / "ckpt") == 0


def test_example_runs_unchanged_under_plain_torchrun(procs, tmp_path: Path) -> None:
    def torchrun(steps: int) -> str:
        env = torchrun_env({k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_AGENT_")}, tmp_path)
        cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(EXAMPLE), "--steps", str(steps),
               "--step-time", "0", "--checkpoint-every", "2", "--checkpoint-dir", str(tmp_path / "ckpt")]
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        out, _ = proc.communicate(timeout=DEADLINE_S)
        assert proc.returncode == 0, out
        return out

    out = torchrun(5)
    assert "starting from step 0" in out and "step 4 world_size 2 loss" in out and "done" in out
    out = torchrun(7)
    assert "resumed from step 4 (checkpoint of step 3)" in out
    assert "step 3 world_size" not in out and "step 6 world_size 2 loss" in out


def test_single_process_helper_reports_progress_and_drains(tmp_path: Path) -> None:
    from agent.worker import Elastic, WorkerConfigError

    env = {CHECKPOINT_DIR_ENV: str(tmp_path / "ckpt"), ROUND_ENV: "4",
           PROGRESS_FILE_ENV: str(tmp_path / "progress.json"), CONTROL_FILE_ENV: str(tmp_path / "control")}
    el = Elastic(checkpoint_every=2, environ=env, clock=lambda: 99.5, monotonic=lambda: 7.25)
    assert el.load(default=lambda: {"w": 0}) == (0, {"w": 0})
    assert el.step(0, lambda: {"w": 0}) is False
    assert read_progress(tmp_path / "progress.json") == {"v": 1, "step": 0, "time": 99.5, "mono": 7.25,
                                                         "pid": os.getpid(), "phase": "train", "mode": "plain",
                                                         "round": 4}
    assert el.step(1, lambda: {"w": 1}) is False  # periodic checkpoint of step 1
    assert ckpt.latest_step(tmp_path / "ckpt") == 1
    (tmp_path / "control").write_text("")  # exists but not (yet) a drain: keep going
    assert el.step(2, lambda: {"w": 2}) is False
    control.write(tmp_path / "control", control.Control(seq=1, stop_at=3))
    assert el.step(3, lambda: {"w": 3}) is True
    assert read_progress(tmp_path / "progress.json")["phase"] == "drained"
    assert Elastic(environ=env).load(default=None) == (4, {"w": 3})

    with pytest.raises(WorkerConfigError, match=r"ELASTIC_AGENT_ROUND \('x'\) must be an integer"):
        Elastic(environ={ROUND_ENV: "x"})


def test_single_process_helper_without_the_agent_does_nothing_agent_specific(tmp_path: Path) -> None:
    from agent.worker import Elastic

    el = Elastic(checkpoint_every=1, environ={})
    assert el.checkpoint_dir is None and el.progress_file is None and el.control_file is None
    assert el.load(default=7) == (0, 7)
    assert el.step(0, lambda: {"w": 0}) is False  # no directory: no checkpoint, no error
    el.finish()
    assert list(tmp_path.iterdir()) == []
