"""The GPU path of recovery in process, the parts that need no GPU: the environment and the
device set before a group forms, the pre-step hook waiting for the step's collectives before
it decides, and the helper's side group renewed at each re-form. Fakes stand in for CUDA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from agent.worker import groups
from agent.worker.helper import Agreement
from agent.worker.inprocess import InProcess


class FakeCuda:
    def __init__(self, available: bool = True, count: int = 2) -> None:
        self.available, self.count, self.device = available, count, None

    def is_available(self) -> bool:
        return self.available

    def device_count(self) -> int:
        return self.count

    def set_device(self, index: int) -> None:
        self.device = index


def test_before_a_group_forms_the_rank_takes_its_gpu_and_nccl_async_error_handling_is_off():
    environ = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}  # the agent's default for plain scripts
    cuda = FakeCuda()
    assert groups.prepare(environ, 1, cuda) == ["TORCH_NCCL_ASYNC_ERROR_HANDLING"]
    assert cuda.device == 1
    assert environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0"
    assert groups.prepare(environ, 1, cuda) == []  # already so: nothing changed


def test_without_cuda_or_with_one_gpu_per_process_no_device_is_set():
    for cuda in (FakeCuda(available=False), FakeCuda(count=1)):
        groups.prepare({}, 1, cuda)
        assert cuda.device is None


def test_the_step_is_refused_when_its_all_reduce_was_cut_while_it_ran_on_the_gpu(monkeypatch):
    """DDP hands the CPU back before NCCL's all-reduce ran; the watchdog cuts the group while
    it runs. The hook must wait for the GPU before reading the abort flag."""
    worker = SimpleNamespace(snapshots=None, _aborted=False, round=3)

    class Stream:
        def synchronize(self) -> None:  # the GPU finishes the cut all-reduce only now
            worker._aborted = True

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    worker.model = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(is_cuda=True)]))
    with pytest.raises(groups.Aborted):
        InProcess._before_optimizer_step(worker)


def test_each_reform_drops_the_helpers_side_group_of_the_old_members():
    agreement = Agreement()
    agreement._group, agreement._device = object(), torch.device("cpu")
    InProcess._renew_side_groups(SimpleNamespace(el=SimpleNamespace(agreement=agreement)))
    assert (agreement._group, agreement._device) == (None, None)  # formed anew on first use, in the new group

