"""The helper with sharded (FSDP2) state in one process (a one-rank gloo group): what it writes,
when a save is committed, and the clear errors for what it cannot do. The multi-rank
behaviour (re-sharding, fallback on a damaged shard) is in tests/e2e/test_sharded_e2e.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp import fully_shard

from agent.worker import Elastic
from agent.worker.checkpoint import StaleCheckpointError, complete_checkpoints
from agent.worker.helper import WorkerConfigError
from agent.worker.manifest import CheckpointError, manifest_name, raise_fence
from agent.worker.sharded import is_sharded


@pytest.fixture()
def group(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def fsdp_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(3, 4)).sum().backward()
    opt.step()
    return model, opt


def batchnorm_fsdp_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    """Big enough that copying it takes a while, with a buffer a forward updates in place."""
    model = nn.Sequential(nn.Linear(1024, 1024), nn.BatchNorm1d(1024), nn.Linear(1024, 1024))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def state_of(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    model_state, opt_state = get_state_dict(model, opt)
    return {"model": model_state, "opt": opt_state}


def test_sharded_state_is_recognised_and_replicated_state_is_not(group: None) -> None:
    model, opt = fsdp_model()
    assert is_sharded(state_of(model, opt))
    assert is_sharded({"model": model.state_dict()})
    assert not is_sharded({"model": nn.Linear(2, 2).state_dict(), "step": 3, "xs": [torch.ones(1)]})


def test_a_sharded_save_is_written_by_dcp_and_committed_with_a_manifest(group: None, tmp_path: Path) -> None:
    model, opt = fsdp_model()
    el = Elastic(tmp_path / "ckpt", keep_last=1)
    el.save(1, state_of(model, opt), wait=False)  # returns once staged; committed in the background
    el.save(2, state_of(model, opt), wait=False)  # waits for step 1 first
    el.finish()  # waits for step 2
    assert [c.step for c in complete_checkpoints(tmp_path / "ckpt")] == [2]  # keep_last=1 removed step 1
    assert el.last_saved_step == 2
    files = json.loads((tmp_path / "ckpt" / manifest_name(2)).read_text())["files"]
    assert set(files) == {".metadata", "__0_0.distcp"}
    assert not [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".tmp-")]


def test_a_late_save_of_an_older_round_is_refused_before_anything_is_written(group: None, tmp_path: Path) -> None:
    model, opt = fsdp_model()
    raise_fence(tmp_path / "ckpt", 5)
    el = Elastic(tmp_path / "ckpt", environ={"ELASTIC_AGENT_ROUND": "4"})
    with pytest.raises(StaleCheckpointError, match="round 4"):
        el.save(1, state_of(model, opt))
    assert complete_checkpoints(tmp_path / "ckpt") == []


def test_a_sharded_resume_from_a_replicated_checkpoint_is_a_clear_error(group: None, tmp_path: Path) -> None:
    Elastic(tmp_path / "ckpt").save(0, {"model": nn.Linear(2, 2).state_dict()})
    model, opt = fsdp_model()
    with pytest.raises(CheckpointError, match="holds replicated state"):
        Elastic(tmp_path / "ckpt").load(default=lambda: state_of(model, opt))


def test_an_optimizer_state_that_would_not_be_loaded_is_a_clear_error(group: None, tmp_path: Path) -> None:
    model, opt = fsdp_model()
    Elastic(tmp_path / "ckpt").save(0, state_of(model, opt))
    fresh, fresh_opt = fsdp_model()
    fresh_opt.state.clear()  # as opt.state_dict() is before the first step: no moments to load into
    with pytest.raises(CheckpointError, match="get_state_dict"):
        Elastic(tmp_path / "ckpt").load(default=lambda: {"model": fresh.state_dict(), "opt": fresh_opt.state_dict()})


def test_sharded_state_that_is_not_a_dict_is_a_clear_error(group: None, tmp_path: Path) -> None:
    model, _ = fsdp_model()
    with pytest.raises(CheckpointError, match="must be a dict with string keys"):
        Elastic(tmp_path / "ckpt").save(0, [model.state_dict()])


def test_el_run_refuses_a_sharded_model_without_build_model_with_a_clear_error(group: None, tmp_path: Path) -> None:
    model, opt = fsdp_model()
    with pytest.raises(WorkerConfigError, match="el.run needs build_model= for a sharded model"):
        Elastic(tmp_path / "ckpt").run(lambda step, m: None, model=model, optimizer=opt, steps=1)


def test_the_checkpoint_holds_the_saved_step_while_training_goes_on_during_the_copy(
        group: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy to host memory runs in a thread: the optimizer step and the forward right after
    ``save`` returns must not leak into the checkpoint of the step saved."""
    copy = DefaultStager._stage

    def slow_copy(self: DefaultStager, *args: object, **kwargs: object) -> object:
        time.sleep(0.5)  # a slow copy (a big model), so the next steps surely start during it
        return copy(self, *args, **kwargs)

    monkeypatch.setattr(DefaultStager, "_stage", slow_copy)
    torch.manual_seed(0)
    model, opt = batchnorm_fsdp_model()

    def train_step() -> None:
        model(torch.randn(8, 1024)).pow(2).mean().backward()  # updates BatchNorm's running stats
        opt.step()
        opt.zero_grad()

    train_step()
    saved = {key: (value.full_tensor() if hasattr(value, "full_tensor") else value).clone()
             for key, value in model.state_dict().items()}
    el = Elastic(tmp_path / "ckpt")
    el.save(1, state_of(model, opt), wait=False)
    train_step()  # at once: the copy of step 1 may still be running
    train_step()
    el.finish()

    fresh, fresh_opt = batchnorm_fsdp_model()
    fresh(torch.randn(8, 1024)).sum().backward()
    fresh_opt.step()
    assert el.load(state_of(fresh, fresh_opt)) is not None
    for key, value in fresh.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        assert torch.equal(value, saved[key]), key
