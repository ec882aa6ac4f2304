"""The worker contract as data: the environment each worker process gets, and GPU counting.

``worker_env`` is the one place the torchrun-compatible variables are written, so that
unmodified torchrun scripts run under the agent. Nothing here imports torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

from agent.errors import ConfigError

NVIDIA_GPUS_DIR = Path("/proc/driver/nvidia/gpus")
NVIDIA_SMI_TIMEOUT_S = 5.0


def worker_env(
    base: Mapping[str, str],
    *,
    local_rank: int,
    local_world_size: int,
    group_rank: int,
    group_world_size: int,
    rank_offset: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    restart_count: int,
    max_restarts: int,
    run_id: str,
    error_file: str,
    node_id: str,
    round_number: int,
    checkpoint_dir: str | None,
    progress_file: str | None,
    control_file: str | None = None,
    snapshot_dir: str | None = None,
) -> dict[str, str]:
    """``base`` plus the variables of one worker. ``rank_offset`` is the global rank of local
    rank 0. Paths are absolute: a worker that changes directory still finds them."""
    rank = rank_offset + local_rank
    contract = {
        # torchrun / torch.distributed.elastic
        "RANK": rank,
        "LOCAL_RANK": local_rank,
        "WORLD_SIZE": world_size,
        "LOCAL_WORLD_SIZE": local_world_size,
        "GROUP_RANK": group_rank,
        "GROUP_WORLD_SIZE": group_world_size,
        "ROLE_RANK": rank,
        "ROLE_WORLD_SIZE": world_size,
        "ROLE_NAME": "default",
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": master_port,
        "TORCHELASTIC_RESTART_COUNT": restart_count,
        "TORCHELASTIC_MAX_RESTARTS": max_restarts,
        "TORCHELASTIC_RUN_ID": run_id,
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCHELASTIC_ERROR_FILE": error_file,
        # ours
        "ELASTIC_AGENT_NODE_ID": node_id,
        "ELASTIC_AGENT_ROUND": round_number,
        "ELASTIC_AGENT_PID": os.getpid(),
    }
    # Defaults that the user's own environment may override.
    overridable = {
        "OMP_NUM_THREADS": 1,
        # For plain scripts: a failed NCCL collective ends the process, and the agent restarts
        # it. In-process workers (el.run) need 0, which the helper sets before it forms a
        # group (agent.worker.groups.INPROCESS_ENV): the agent cannot know the mode before
        # the workers run and report it.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": 1,
        # torchrun's default --signals-to-handle: scripts that install their own handlers read it.
        "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
    }
    optional = {
        "ELASTIC_AGENT_CHECKPOINT_DIR": checkpoint_dir,
        "ELASTIC_AGENT_PROGRESS_FILE": progress_file,
        "ELASTIC_AGENT_CONTROL_FILE": control_file,
        "ELASTIC_AGENT_SNAPSHOT_DIR": snapshot_dir,
    }
    env = dict(base)
    for name, value in overridable.items():
        env.setdefault(name, str(value))
    env.update({name: str(value) for name, value in contract.items()})
    for name, value in optional.items():
        if value is not None:
            env[name] = str(value)
        else:
            # Never let a stale value from the agent's own environment reach the workers.
            env.pop(name, None)
    return env


def _count_cuda_visible(value: str) -> int:
    """CUDA's rule: devices are listed up to the first invalid entry (e.g. ``-1`` hides all)."""
    count = 0
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or (entry.lstrip("-").isdigit() and int(entry) < 0):
            break
        count += 1
    return count


def gpu_probe(
    environ: Mapping[str, str],
    *,
    gpus_dir: Path = NVIDIA_GPUS_DIR,
    which: Callable[[str], str | None] = shutil.which,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> tuple[int, str]:
    """The number of visible GPUs, and how it was found (for messages)."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        value = environ["CUDA_VISIBLE_DEVICES"]
        return _count_cuda_visible(value), f"CUDA_VISIBLE_DEVICES={value!r}"
    try:
        entries = list(gpus_dir.iterdir())
    except OSError:
        entries = []
    if entries:
        return len(entries), f"{len(entries)} entries in {gpus_dir}"
    smi = which("nvidia-smi")
    if smi is None:
        return 0, f"CUDA_VISIBLE_DEVICES unset, nothing in {gpus_dir}, no nvidia-smi on PATH"
    try:
        result = run([smi, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        return 0, f"nvidia-smi -L failed: {type(exc).__name__}"
    if result.returncode != 0:
        return 0, f"nvidia-smi -L exited with code {result.returncode}"
    count = sum(1 for line in result.stdout.splitlines() if line.startswith("GPU "))
    return count, f"nvidia-smi -L listed {count}"


def visible_gpu_count(environ: Mapping[str, str], **probes: object) -> int:
    """How many GPUs a worker started with ``environ`` would see, without importing torch."""
    return gpu_probe(environ, **probes)[0]  # type: ignore[arg-type]


def resolve_nproc(value: str | int, environ: Mapping[str, str], **probes: object) -> int:
    """``--nproc-per-node`` as a number: itself, or the visible GPU count for ``gpu``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"--nproc-per-node ({value}) must be a positive integer or 'gpu'")
        return value
    text = str(value).strip().lower()
    if text.isdigit() and int(text) >= 1:
        return int(text)
    if text != "gpu":
        raise ConfigError(f"--nproc-per-node ({value!r}) must be a positive integer or 'gpu'")
    count, how = gpu_probe(environ, **probes)  # type: ignore[arg-type]
    if count == 0:
        raise ConfigError(f"--nproc-per-node gpu: no GPU is visible ({how})")
    return count
