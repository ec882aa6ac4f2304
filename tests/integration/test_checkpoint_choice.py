"""The checkpoint a round resumes from is chosen once, by global rank 0, with real gloo processes.

Each test runs two ranks of ``tests/bin/load_once.py`` (see its docstring for the rendezvous
between rank 1 and the test that makes the race deterministic).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.worker import checkpoint as ckpt
from agent.worker.manifest import read_fence
from agent.worker.protocol import CHECKPOINT_DIR_ENV, ROUND_ENV
from tests.integration.test_worker_helper import DEADLINE_S, ROOT, procs, start_ranks, wait_all  # noqa: F401
from tests.unit.test_checkpoint_order import opened  # noqa: F401 - a fixture
from tests.waiting import wait_until

LOAD_ONCE = ROOT / "tests" / "bin" / "load_once.py"


def save_state(directory: Path, step: int, round_number: int | None) -> None:
    import torch

    state = {"step": step, "weights": torch.arange(1000, dtype=torch.float32) * step}
    ckpt.save(directory, step, {"state.pt": lambda f: torch.save(state, f)}, round_number=round_number)


def texts(outputs: list[Path]) -> list[str]:
    return [out.read_text() for out in outputs]


@pytest.mark.parametrize(("round_number", "saved_round"), [(None, None), (2, 1)],
                         ids=["plain torchrun", "under the agent, round 2"])
def test_a_checkpoint_committed_while_ranks_load_does_not_split_them(procs, tmp_path: Path, round_number,
                                                                     saved_round) -> None:
    sync = tmp_path / "sync"
    sync.mkdir()
    save_state(tmp_path / "ckpt", 2, saved_round)
    outputs = start_ranks(procs, tmp_path, [str(sync)], agent=round_number is not None,
                          round_number=round_number or 0, script=LOAD_ONCE)

    wait_until(lambda: (sync / "announced").exists() or any(p.poll() is not None for p in procs), DEADLINE_S,
               "rank 1 to receive rank 0's choice")
    assert (sync / "announced").exists(), f"rank 1 never received a choice from rank 0: {texts(outputs)}"
    # Rank 0 has chosen step 2 and rank 1 has not loaded yet: a newer checkpoint lands now.
    save_state(tmp_path / "ckpt", 6, round_number)
    (sync / "committed").write_text("")

    assert wait_all(procs, outputs) == [0, 0], texts(outputs)
    for text in texts(outputs):
        assert "resumed 3 state 2\n" in text, text
        assert "payload opens 1\n" in text, text  # rank 0 hashed the bytes it loaded; rank 1 read once
    assert ckpt.latest_step(tmp_path / "ckpt") == 6  # the newer one is there, for the next round
    assert read_fence(tmp_path / "ckpt") == round_number


def test_a_rank_that_cannot_see_the_chosen_checkpoint_fails_clearly_and_so_do_the_others(procs,
                                                                                          tmp_path: Path) -> None:
    sync = tmp_path / "sync"
    sync.mkdir()
    (sync / "committed").write_text("")  # nothing to wait for
    save_state(tmp_path / "ckpt", 4, 1)
    local = tmp_path / "node-1-local-disk"
    outputs = start_ranks(procs, tmp_path, [str(sync)], agent=True, round_number=2, script=LOAD_ONCE,
                          checkpoint_dirs=[tmp_path / "ckpt", local])

    assert wait_all(procs, outputs) == [1, 1], texts(outputs)
    rank0, rank1 = texts(outputs)
    assert "CheckpointNotSharedError" in rank1 and "rank 1 cannot load the checkpoint rank 0 chose (step 4" in rank1
    assert str(local) in rank1 and "must be shared by every node" in rank1
    assert "another rank could not load the checkpoint" in rank0
    assert not local.exists() or not list(local.iterdir())


def test_a_rank_0_that_cannot_choose_fails_every_rank(procs, tmp_path: Path) -> None:
    sync = tmp_path / "sync"
    sync.mkdir()
    (sync / "committed").write_text("")
    directory = tmp_path / "ckpt"
    save_state(directory, 4, 1)
    (directory / "step_000000000004.manifest.json").write_text(
        (directory / "step_000000000004.manifest.json").read_text().replace('"state.pt"', '"other.pt"'))
    os.rename(directory / "step_000000000004" / "state.pt", directory / "step_000000000004" / "other.pt")
    outputs = start_ranks(procs, tmp_path, [str(sync)], agent=False, script=LOAD_ONCE)

    assert wait_all(procs, outputs) == [1, 1], texts(outputs)
    rank0, rank1 = texts(outputs)
    assert "has no file 'state.pt'" in rank0
    assert "rank 1: rank 0 could not choose a checkpoint: CheckpointError" in rank1 and "state.pt" in rank1


def test_a_single_process_reads_the_payload_once(tmp_path: Path, opened: list[str]) -> None:
    from agent.worker import Elastic

    save_state(tmp_path / "ckpt", 3, 5)
    opened.clear()
    el = Elastic(environ={CHECKPOINT_DIR_ENV: str(tmp_path / "ckpt"), ROUND_ENV: "6"})
    start, state = el.load(default=None)
    assert (start, state["step"], state["weights"][1].item()) == (4, 3, 3.0)
    assert opened.count(str(tmp_path / "ckpt" / "step_000000000003" / "state.pt")) == 1, opened
    assert read_fence(tmp_path / "ckpt") == 6
