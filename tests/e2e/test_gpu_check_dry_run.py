"""The GPU check's CPU dry run (``make gpu-check GPU_ARGS=--cpu-dry-run``): its four scenarios
with gloo on CPU, through the same scenes, workers and table as on GPUs. Run here so that the
check still works the day a machine with GPUs is at hand (the GPU-only parts, nvidia-smi's
memory samples, are unit-tested in tests/unit/test_gpu_check.py)."""

from __future__ import annotations

import subprocess

import pytest

from tests.e2e.harness import PYTHON, REPO
from tests.gpu.plan import DRAIN, ELRUN, INPROCESS, KILL, NPROC_GPU

pytestmark = pytest.mark.e2e


def test_the_cpu_dry_run_passes_every_scenario_and_prints_the_table() -> None:
    done = subprocess.run([PYTHON, str(REPO / "tests" / "gpu" / "check.py"), "--cpu-dry-run", "--budget", "300"],
                          capture_output=True, text=True, timeout=420, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in done.stdout.splitlines() if line.startswith("| "))}
    assert rows.pop("scenario") == ["scenario", "GPUs", "backend", "outcome", "recovery s", "steps lost", "notes"]
    assert sorted(rows) == sorted([NPROC_GPU, KILL, INPROCESS, ELRUN, DRAIN]), done.stdout
    assert {name: (cells[2], cells[3]) for name, cells in rows.items()} == dict.fromkeys(rows, ("gloo (cpu)", "PASS"))
    assert "2 workers, LOCAL_RANK 0..1 on cpu" in rows[NPROC_GPU][6], rows[NPROC_GPU]
    # A plain restart goes back to the checkpoint; in process and at a drain nothing is lost.
    assert "resumed from the checkpoint of step" in rows[KILL][6], rows[KILL]
    assert rows[INPROCESS][5] == "0" and "survivors kept their pids" in rows[INPROCESS][6], rows[INPROCESS]
    assert rows[ELRUN][5] == "0" and "TORCH_NCCL_ASYNC_ERROR_HANDLING=0" in rows[ELRUN][6], rows[ELRUN]
    assert rows[DRAIN][5] == "0" and "exited 3" in rows[DRAIN][6], rows[DRAIN]
