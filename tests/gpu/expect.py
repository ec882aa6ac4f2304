"""What the workers' reports (tests/gpu/worker.py) and nvidia-smi must show: pure functions,
so the unit tests cover the CUDA cases on a machine without a GPU."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tests.gpu.plan import Scenario
from tests.gpu.smi import App, normal_uuid


def placement(spec: Scenario, reports: Sequence[dict], inherited: str | None) -> str | None:
    """The first way the workers are not where the torchrun contract puts them (None: all
    are): on each node LOCAL_RANK 0..n-1 and LOCAL_WORLD_SIZE n; the agent's
    CUDA_VISIBLE_DEVICES (``inherited`` when the node was given none) unchanged; the
    scenario's backend; on CUDA, each worker on ``cuda:LOCAL_RANK`` of n visible, one GPU
    per local rank, and one GPU per rank of an NCCL job."""
    cuda = spec.device == "cuda"
    for node in spec.nodes:
        mine = [r for r in reports if r["node"] == node.node_id]
        given = node.cuda_visible if node.cuda_visible is not None else inherited
        ranks = sorted(r["local_rank"] for r in mine)
        if ranks != list(range(node.expected_nproc)):
            return (f"{node.node_id}: LOCAL_RANKs {ranks}, expected 0..{node.expected_nproc - 1} "
                    f"(--nproc-per-node {node.nproc})")
        for r in mine:
            if r["local_world_size"] != node.expected_nproc:
                return f"{node.node_id}: LOCAL_WORLD_SIZE {r['local_world_size']}, expected {node.expected_nproc}"
            if r["cuda_visible_devices"] != given:
                return (f"{node.node_id}: a worker got CUDA_VISIBLE_DEVICES={r['cuda_visible_devices']!r}, "
                        f"its agent had {given!r}")
            if r["backend"] != spec.backend:
                return f"{node.node_id}: backend {r['backend']}, expected {spec.backend}"
            if r["cuda"] != cuda:
                return f"{node.node_id}: torch.cuda.is_available() is {r['cuda']} in a worker"
            if cuda and (r["device"] != r["local_rank"] or r["device_count"] != node.expected_nproc):
                return (f"{node.node_id}: LOCAL_RANK {r['local_rank']} on cuda:{r['device']} of {r['device_count']} "
                        f"visible, expected cuda:{r['local_rank']} of {node.expected_nproc}")
        uuids = [normal_uuid(r["uuid"]) for r in mine]
        if cuda and None not in uuids and len(set(uuids)) != len(uuids):
            return f"{node.node_id}: two local ranks on one GPU"
    if cuda and spec.backend == "nccl":
        uuids = [normal_uuid(r["uuid"]) for r in reports]
        if None not in uuids and len(set(uuids)) != len(uuids):
            return "two ranks of an NCCL job on one GPU"
    return None


def reformed_in_process(spec: Scenario, reports: Sequence[dict], hooks: Sequence[dict], kept: set[int],
                        first_round: int) -> str | None:
    """The first way the survivors' re-formed groups are not what the in-process GPU path
    promises (None: they are): every kept worker re-formed with TORCH_NCCL_ASYNC_ERROR_HANDLING
    0 (the helper's: NCCL's watchdog must not end the process), on CUDA on ``cuda:LOCAL_RANK``
    (the helper's set_device), and its pre-step hook ran in the new round, on CUDA with the
    current stream idle when it returned (it waited for the step's all-reduce)."""
    later = [r for r in reports if r["pid"] in kept and r["round"] > first_round]
    for pid in sorted(kept - {r["pid"] for r in later}):
        return f"worker {pid} wrote no report of a re-formed group"
    for r in later:
        if r.get("nccl_async_error_handling") != "0":
            return (f"worker {r['pid']} re-formed round {r['round']} with TORCH_NCCL_ASYNC_ERROR_HANDLING="
                    f"{r.get('nccl_async_error_handling')!r}, expected '0' (set by the helper)")
        if spec.device == "cuda" and r["device"] != r["local_rank"]:
            return f"worker {r['pid']} re-formed on cuda:{r['device']}, expected cuda:{r['local_rank']} (LOCAL_RANK)"
    for pid in sorted(kept):
        mine = [h for h in hooks if h["pid"] == pid and h["round"] > first_round]
        if not mine:
            return f"worker {pid}: the pre-step hook did not run after the re-form"
        if spec.device == "cuda" and not all(h["cuda"] and h["stream_idle"] for h in mine):
            return f"worker {pid}: the pre-step hook returned with GPU work still queued ({mine[0]})"
    return None


def strangers(reports: Sequence[dict], known_uuids: Sequence[str]) -> set[str]:
    """GPUs the workers ran on that nvidia-smi does not list (a UUID form we do not know: MIG?)."""
    known = {normal_uuid(u) for u in known_uuids}
    return {u for u in (normal_uuid(r["uuid"]) for r in reports) if u} - known


def foreign(reports: Sequence[dict], apps: Sequence[App]) -> dict[int, set[str]]:
    """Workers holding memory on a GPU other than the one they run on (a CUDA context made
    there, e.g. by unpickling another rank's CUDA tensors): pid -> those GPUs."""
    own = {r["pid"]: normal_uuid(r["uuid"]) for r in reports}
    out: dict[int, set[str]] = {}
    for app in apps:
        gpu = normal_uuid(app.gpu_uuid)
        if app.pid in own and gpu and gpu != own[app.pid]:
            out.setdefault(app.pid, set()).add(gpu)
    return out


def over_baseline(now: Mapping[str, int], baseline: Mapping[str, int], gpus: set[str], margin: int
                  ) -> dict[str, int]:
    """MiB used above the run's baseline, on those of ``gpus`` (normalised UUIDs) above ``margin``."""
    extra = {u: now[u] - baseline.get(u, 0) for u in gpus if u in now and now[u] >= 0}
    return {u: mib for u, mib in extra.items() if mib > margin}
