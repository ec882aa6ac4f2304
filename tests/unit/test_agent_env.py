"""agent.env: the torchrun contract table, GPU counting and --nproc-per-node gpu."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent.daemon.workers.env import gpu_probe, resolve_nproc, visible_gpu_count, worker_env
from agent.errors import ConfigError


def env_for(node: int, local_rank: int, base: dict[str, str] | None = None, **overrides: object) -> dict[str, str]:
    """Node ``node`` of a 2-node x 4-process job."""
    arguments: dict[str, object] = dict(
        local_rank=local_rank,
        local_world_size=4,
        group_rank=node,
        group_world_size=2,
        rank_offset=4 * node,
        world_size=8,
        master_addr="node-a.example",
        master_port=29500,
        restart_count=2,
        max_restarts=3,
        run_id="llama-ft",
        error_file=f"/logs/{local_rank}/error.json",
        node_id="node-b",
        round_number=7,
        checkpoint_dir="/ckpt",
        progress_file=f"/logs/{local_rank}/progress",
    )
    arguments.update(overrides)
    return worker_env(base if base is not None else {"PATH": "/usr/bin"}, **arguments)  # type: ignore[arg-type]


def test_two_nodes_by_four_processes_second_node_rank_three() -> None:
    env = env_for(node=1, local_rank=3)
    assert env == {
        "PATH": "/usr/bin",
        "RANK": "7",
        "LOCAL_RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
        "GROUP_WORLD_SIZE": "2",
        "ROLE_RANK": "7",
        "ROLE_WORLD_SIZE": "8",
        "ROLE_NAME": "default",
        "MASTER_ADDR": "node-a.example",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RESTART_COUNT": "2",
        "TORCHELASTIC_MAX_RESTARTS": "3",
        "TORCHELASTIC_RUN_ID": "llama-ft",
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCHELASTIC_ERROR_FILE": "/logs/3/error.json",
        "OMP_NUM_THREADS": "1",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
        "ELASTIC_AGENT_NODE_ID": "node-b",
        "ELASTIC_AGENT_ROUND": "7",
        "ELASTIC_AGENT_PID": str(os.getpid()),
        "ELASTIC_AGENT_CHECKPOINT_DIR": "/ckpt",
        "ELASTIC_AGENT_PROGRESS_FILE": "/logs/3/progress",
    }


def test_ranks_cover_the_world_exactly_once() -> None:
    ranks = sorted(int(env_for(node, local)["RANK"]) for node in (0, 1) for local in range(4))
    assert ranks == list(range(8))


def test_user_settings_respected_and_contract_wins() -> None:
    base = {"OMP_NUM_THREADS": "8", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0", "RANK": "99"}
    env = env_for(0, 0, base=base)
    assert env["OMP_NUM_THREADS"] == "8"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0"
    assert env["RANK"] == "0"
    assert base == {"OMP_NUM_THREADS": "8", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0", "RANK": "99"}


def test_optional_variables_absent_when_not_given_even_if_inherited() -> None:
    base = {"ELASTIC_AGENT_CHECKPOINT_DIR": "/stale", "ELASTIC_AGENT_PROGRESS_FILE": "/stale"}
    env = env_for(0, 0, base=base, checkpoint_dir=None, progress_file=None)
    assert "ELASTIC_AGENT_CHECKPOINT_DIR" not in env
    assert "ELASTIC_AGENT_PROGRESS_FILE" not in env


def no_smi(_: str) -> None:
    return None


@pytest.mark.parametrize(
    "value,count",
    [("0,1,2", 3), ("", 0), ("-1", 0), ("0,-1,2", 1), ("GPU-1a2b,GPU-3c4d", 2), ("3", 1)],
)
def test_cuda_visible_devices(value: str, count: int, tmp_path: Path) -> None:
    (tmp_path / "0000:01:00.0").mkdir()  # ignored: CUDA_VISIBLE_DEVICES decides
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": value}, gpus_dir=tmp_path, which=no_smi) == count


def test_proc_driver_entries(tmp_path: Path) -> None:
    for bus in ("0000:01:00.0", "0000:02:00.0"):
        (tmp_path / bus).mkdir()
    assert visible_gpu_count({}, gpus_dir=tmp_path, which=no_smi) == 2


def test_nvidia_smi_fallback(tmp_path: Path) -> None:
    calls = []

    def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append((args, kwargs.get("timeout")))
        listing = "GPU 0: NVIDIA H100 (UUID: GPU-1)\nGPU 1: NVIDIA H100 (UUID: GPU-2)\n"
        return subprocess.CompletedProcess(args, 0, stdout=listing, stderr="")

    count = visible_gpu_count({}, gpus_dir=tmp_path / "missing", which=lambda _: "/bin/nvidia-smi", run=run)
    assert count == 2
    assert calls == [(["/bin/nvidia-smi", "-L"], 5.0)]


def test_nvidia_smi_timeout_counts_zero(tmp_path: Path) -> None:
    def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(args, 5.0)

    assert gpu_probe({}, gpus_dir=tmp_path, which=lambda _: "/bin/nvidia-smi", run=run) == (
        0,
        "nvidia-smi -L failed: TimeoutExpired",
    )


def test_resolve_nproc() -> None:
    assert resolve_nproc(3, {}) == 3
    assert resolve_nproc("4", {}) == 4
    assert resolve_nproc("gpu", {"CUDA_VISIBLE_DEVICES": "0,1"}) == 2


def test_resolve_nproc_gpu_without_gpus(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_nproc("gpu", {}, gpus_dir=tmp_path, which=no_smi)
    assert str(caught.value) == (
        "--nproc-per-node gpu: no GPU is visible "
        f"(CUDA_VISIBLE_DEVICES unset, nothing in {tmp_path}, no nvidia-smi on PATH)"
    )
    with pytest.raises(ConfigError, match=r"^--nproc-per-node gpu: no GPU is visible \(CUDA_VISIBLE_DEVICES=''\)$"):
        resolve_nproc("gpu", {"CUDA_VISIBLE_DEVICES": ""})
