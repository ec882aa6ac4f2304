"""The GPU check's worker: ``docs/examples/train_ddp.py`` itself, run in this process with its
arguments, plus what the check needs to know and choose (all through the environment):

- ``GPU_CHECK_BACKEND`` (``nccl`` | ``gloo``): the backend of every process group this worker
  forms, the script's and those the in-process helper re-forms. The example picks NCCL
  whenever CUDA is there; when two ranks share one GPU NCCL refuses (one GPU per rank), so
  the check uses gloo with the same CUDA tensors there.
- ``GPU_CHECK_REPORT_DIR``: after each process group is formed, a JSON file per (pid, round)
  says where this worker runs: its ranks, ``CUDA_VISIBLE_DEVICES`` as the agent gave it,
  the current CUDA device and that device's UUID, the backend.
- ``GPU_CHECK_HIDE_CUDA=1`` (the dry run): torch sees no GPU, whatever the agent was given.
- ``GPU_CHECK_HELPER_FORMS=1``: the example neither sets the device nor forms the group;
  el.run does both (its first group then has the helper's NCCL setting from the start).

Each report also carries ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` as the group was formed (the
in-process helper sets 0 before it re-forms: NCCL's own watchdog would otherwise end the
process). And the in-process helper's pre-step hook (``groups.await_step_collectives``) is
watched: at its first call in each round a ``<pid>-<round>.hook`` file says whether the
model was on CUDA and whether the current stream had no work left once the hook returned
(the step's all-reduce ran before the step was decided).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path

GIVEN_CUDA_VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")
if os.environ.get("GPU_CHECK_HIDE_CUDA") == "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA is first initialised (import torch does not)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

TRAIN = Path(__file__).resolve().parents[2] / "docs" / "examples" / "train_ddp.py"
_init_process_group = dist.init_process_group


def where() -> dict[str, object]:
    cuda = torch.cuda.is_available()
    device = torch.cuda.current_device() if cuda else None
    uuid = None
    if cuda:
        try:
            uuid = str(torch.cuda.get_device_properties(device).uuid)
        except (AttributeError, RuntimeError):
            pass
    env = os.environ
    return {
        "pid": os.getpid(), "node": env.get("ELASTIC_AGENT_NODE_ID"), "round": int(env.get("ELASTIC_AGENT_ROUND", "0")),
        "rank": dist.get_rank(), "world_size": dist.get_world_size(), "local_rank": int(env.get("LOCAL_RANK", "-1")),
        "local_world_size": int(env.get("LOCAL_WORLD_SIZE", "-1")), "cuda_visible_devices": GIVEN_CUDA_VISIBLE,
        "backend": str(dist.get_backend()), "cuda": cuda, "device_count": torch.cuda.device_count() if cuda else 0,
        "device": device, "uuid": uuid, "time": time.time(),
        "nccl_async_error_handling": env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"),
    }


def report() -> None:
    folder = os.environ.get("GPU_CHECK_REPORT_DIR")
    if not folder:
        return
    info = where()
    target = Path(folder) / f"{info['pid']}-{info['round']}.json"
    temp = target.with_name(f".{target.name}.tmp")
    temp.write_text(json.dumps(info))
    os.replace(temp, target)


# GPU_CHECK_HELPER_FORMS=1: the example's own set_device and init_process_group (its first
# calls, before el.run) are skipped, so el.run sets the device and forms every group itself.
_SKIP = {"init", "set_device"} if os.environ.get("GPU_CHECK_HELPER_FORMS") == "1" else set()
_set_device, _get_rank = torch.cuda.set_device, dist.get_rank


def set_device(device: object) -> None:
    if "set_device" in _SKIP:
        _SKIP.discard("set_device")
        return
    _set_device(device)  # type: ignore[arg-type]


def get_rank(*args: object, **kwargs: object) -> int:
    if not dist.is_initialized():  # the example asks before el.run formed the group
        return int(os.environ.get("RANK", "0"))
    return _get_rank(*args, **kwargs)  # type: ignore[arg-type]


def init_process_group(*args: object, **kwargs: object) -> object:
    if "init" in _SKIP:
        _SKIP.discard("init")
        return None
    backend = os.environ.get("GPU_CHECK_BACKEND")
    if backend:
        if args:
            args = (backend, *args[1:])
        else:
            kwargs["backend"] = backend
    formed = _init_process_group(*args, **kwargs)
    report()
    return formed


dist.init_process_group = init_process_group  # what the example and agent.worker.inprocess call
if _SKIP:
    torch.cuda.set_device, dist.get_rank = set_device, get_rank


def _watch_hook() -> None:
    from agent.worker import groups  # noqa: PLC0415 - the helper's module, patched where it calls it

    awaited = groups.await_step_collectives
    seen: set[str] = set()

    def await_step_collectives(model: torch.nn.Module) -> None:
        awaited(model)
        folder, round_number = os.environ.get("GPU_CHECK_REPORT_DIR"), os.environ.get("ELASTIC_AGENT_ROUND", "0")
        if not folder or round_number in seen:
            return
        seen.add(round_number)
        on_cuda = any(p.is_cuda for p in model.parameters())
        idle = bool(torch.cuda.current_stream().query()) if on_cuda else None
        target = Path(folder) / f"{os.getpid()}-{round_number}.hook"
        temp = target.with_name(f".{target.name}.tmp")
        temp.write_text(json.dumps({"pid": os.getpid(), "round": int(round_number), "cuda": on_cuda,
                                    "stream_idle": idle}))
        os.replace(temp, target)

    groups.await_step_collectives = await_step_collectives


_watch_hook()

if __name__ == "__main__":
    sys.argv = [str(TRAIN), *sys.argv[1:]]
    runpy.run_path(str(TRAIN), run_name="__main__")
