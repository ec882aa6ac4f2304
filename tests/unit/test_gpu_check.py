"""The GPU check's logic without a GPU: what runs on which machine, the nvidia-smi parsers,
the table, the steps-lost arithmetic, the waits for GPU memory to be released (on a scripted
nvidia-smi), and the CLI's no-GPU and wrong-torch paths (tests/gpu/). The scenarios run on
GPUs with `make gpu-check` only; their CPU dry run is tests/e2e/test_gpu_check_dry_run.py."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from tests.gpu import check, expect
from tests.gpu.plan import (
    DRAIN,
    ELRUN,
    INPROCESS,
    KILL,
    NPROC_GPU,
    PASS,
    SCENARIOS,
    SKIP,
    Result,
    plan,
    split,
    steps_lost,
    table,
)
from tests.gpu.smi import App, Gpu, Smi, normal_uuid, parse_apps, parse_gpus

ROOT = Path(__file__).resolve().parents[2]
RUN_SH = ROOT / "tests" / "gpu" / "run.sh"


class FakeRun:
    """subprocess.run for Smi: answers by the first query argument."""

    def __init__(self, answers: dict[str, tuple[int, str]]) -> None:
        self.answers, self.calls = answers, []

    def __call__(self, argv, **_kw):
        self.calls.append(argv)
        code, text = self.answers.get(argv[1].split("=")[0], (0, ""))
        return subprocess.CompletedProcess(argv, code, text if code == 0 else "", text if code else "")


def smi_with(gpus: str, code: int = 0) -> Smi:
    return Smi("/usr/bin/nvidia-smi", run=FakeRun({"--query-gpu": (code, gpus)}))


TWO = "0, GPU-aaaa-1, NVIDIA H100 80GB HBM3, 4, 81559\n1, GPU-bbbb-2, NVIDIA H100 80GB HBM3, 4, 81559\n"


def test_parsers_read_nvidia_smi_csv_and_skip_what_is_not_a_row() -> None:
    assert parse_gpus(TWO + "\n") == [Gpu(0, "GPU-aaaa-1", "NVIDIA H100 80GB HBM3", 4, 81559),
                                     Gpu(1, "GPU-bbbb-2", "NVIDIA H100 80GB HBM3", 4, 81559)]
    assert parse_gpus("No devices were found\n") == []
    assert parse_apps("4242, GPU-aaaa-1, 512\n4343, GPU-bbbb-2, [N/A]\nNo running processes found\n") == [
        App(4242, "GPU-aaaa-1", 512), App(4343, "GPU-bbbb-2", -1)]
    assert normal_uuid("GPU-5B6B-1E") == normal_uuid("5b6b1e") == "5b6b1e" and normal_uuid(None) is None


def test_detect_says_how_it_found_out() -> None:
    assert Smi(binary=None).detect() == ([], "nvidia-smi not on PATH")
    assert smi_with("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver", 9).detect() == (
        [], "nvidia-smi exited with code 9: NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver")
    gpus, how = smi_with(TWO).detect()
    assert len(gpus) == 2 and how == "nvidia-smi lists 2"
    assert Smi(binary=None).apps() == [] and not Smi(binary=None).present


def shape(scenarios):
    return [(s.name, s.backend, s.device, s.world_size,
             tuple((n.cuda_visible, n.nproc, n.expected_nproc) for n in s.nodes)) for s in scenarios]


def test_the_dry_run_pretends_gpus_through_cuda_visible_devices_and_uses_gloo_on_cpu() -> None:
    assert shape(plan([], dry_run=True)) == [
        (NPROC_GPU, "gloo", "cpu", 2, (("0,1", "gpu", 2),)),
        *[(name, "gloo", "cpu", 2, (("0", "gpu", 1), ("0", "gpu", 1))) for name in (KILL, INPROCESS, ELRUN, DRAIN)]]


def test_one_gpu_nccl_for_the_single_rank_job_gloo_with_cuda_tensors_when_two_ranks_share_it() -> None:
    scenarios = plan(["GPU-a"])
    assert shape(scenarios) == [
        (NPROC_GPU, "nccl", "cuda", 1, ((None, "gpu", 1),)),
        *[(name, "gloo", "cuda", 2, ((None, "gpu", 1), (None, "gpu", 1)))
          for name in (KILL, INPROCESS, ELRUN, DRAIN)]]
    assert [s.label for s in scenarios] == ["nccl"] + ["gloo (cuda tensors)"] * 4
    assert "NCCL needs a GPU per rank" in scenarios[1].why


@pytest.mark.parametrize(("count", "halves"), [(2, (1, 1)), (3, (2, 1)), (8, (4, 4))])
def test_several_gpus_split_between_two_nodes_all_nccl(count: int, halves: tuple[int, int]) -> None:
    uuids = [f"GPU-{i}" for i in range(count)]
    first, second = split(uuids)
    assert (len(first), len(second)) == halves and first + second == uuids
    scenarios = plan(uuids)
    assert shape(scenarios)[0] == (NPROC_GPU, "nccl", "cuda", count, ((None, "gpu", count),))
    for s in scenarios[1:]:
        assert (s.backend, s.device, s.world_size, s.gpus) == ("nccl", "cuda", count, count)
        assert [n.cuda_visible for n in s.nodes] == [",".join(first), ",".join(second)]
    assert plan([]) == []


def test_steps_lost_after_a_restart_from_a_checkpoint_and_after_a_drain() -> None:
    killed = [(1.0, 18, 2), (1.1, 19, 2), (5.0, 10, 1), (5.1, 11, 1)]  # resumed from the checkpoint of step 9
    assert steps_lost(killed, at=2.0, world_size=1) == (19, 10, 10)
    drained = [(1.0, 18, 2), (2.5, 19, 2), (2.6, 20, 2), (5.0, 21, 1)]  # steps after the SIGTERM count
    assert steps_lost(drained, at=2.0, world_size=1) == (20, 21, 0)
    assert steps_lost(drained, at=6.0, world_size=1) == (None, None, None)


def test_table_has_the_columns_and_a_row_per_scenario() -> None:
    ok = Result(KILL, 2, "nccl", PASS, 2.345, 6, ["resumed from the checkpoint of step 9"])
    skipped = Result(DRAIN, 2, "nccl", SKIP, notes=["not started: the run's --budget is spent"])
    assert table([ok, skipped]).splitlines() == [
        "| scenario      | GPUs | backend | outcome | recovery s | steps lost | notes |",
        "|---------------|------|---------|---------|------------|------------|---|",
        "| kill-9        | 2    | nccl    | PASS    | 2.35       | 6          | resumed from the checkpoint of step 9 |",
        "| sigterm-drain | 2    | nccl    | SKIP    | -          | -          | not started: the run's --budget is spent |",
    ]
    failed = Result(INPROCESS, 1, "gloo (cuda tensors)")
    failed.note("2 nodes")
    failed.fail("no training within 180s")
    assert table([failed]).splitlines()[2].endswith("| FAIL    | -          | -          | no training within 180s; 2 nodes |")


def report(node: str, local_rank: int, uuid: str | None, *, nproc: int = 2, cvd: str | None = None,
           backend: str = "nccl", device: int | None = -1, count: int | None = None, pid: int | None = None) -> dict:
    return {"pid": pid or 100 + local_rank, "node": node, "round": 1, "local_rank": local_rank,
            "local_world_size": nproc, "cuda_visible_devices": cvd, "backend": backend, "cuda": uuid is not None,
            "device": local_rank if device == -1 else device, "device_count": nproc if count is None else count,
            "uuid": uuid}


def test_placement_on_cuda_one_worker_per_gpu_on_cuda_local_rank() -> None:
    spec = plan(["GPU-a", "GPU-b"])[0]  # one node, --nproc-per-node gpu -> 2, NCCL
    good = [report("node-0", 0, "a"), report("node-0", 1, "b")]
    assert expect.placement(spec, good, inherited=None) is None
    assert expect.placement(spec, [good[0]], inherited=None) == (
        "node-0: LOCAL_RANKs [0], expected 0..1 (--nproc-per-node gpu)")
    assert expect.placement(spec, [good[0], report("node-0", 1, "b", device=0)], inherited=None) == (
        "node-0: LOCAL_RANK 1 on cuda:0 of 2 visible, expected cuda:1 of 2")
    assert expect.placement(spec, [good[0], report("node-0", 1, "a")], inherited=None) == (
        "node-0: two local ranks on one GPU")
    assert expect.placement(spec, good, inherited="0,1") == (
        "node-0: a worker got CUDA_VISIBLE_DEVICES=None, its agent had '0,1'")
    assert expect.placement(spec, [report("node-0", 0, None), good[1]], inherited=None) == (
        "node-0: torch.cuda.is_available() is False in a worker")


def test_an_in_process_reform_on_cuda_has_the_helpers_environment_device_and_waiting_hook() -> None:
    spec = next(s for s in plan(["GPU-a", "GPU-b"]) if s.name == INPROCESS)
    assert spec.device == "cuda"

    def reformed(local_rank: int, handling: str | None = "0", device: int = -1) -> dict:
        return {**report("node-0", local_rank, "ab"[local_rank], device=device), "round": 2,
                "nccl_async_error_handling": handling}

    def hook(pid: int, idle: bool | None = True, cuda: bool = True) -> dict:
        return {"pid": pid, "round": 2, "cuda": cuda, "stream_idle": idle}

    first = [report("node-0", 0, "a"), report("node-0", 1, "b")]  # the script's round: its own setting
    good, hooks, kept = [reformed(0), reformed(1)], [hook(100), hook(101)], {100, 101}
    assert expect.reformed_in_process(spec, first + good, hooks, kept, 1) is None
    assert expect.reformed_in_process(spec, first + good[:1], hooks, kept, 1) == (
        "worker 101 wrote no report of a re-formed group")
    assert expect.reformed_in_process(spec, [reformed(0, "1"), good[1]], hooks, kept, 1) == (
        "worker 100 re-formed round 2 with TORCH_NCCL_ASYNC_ERROR_HANDLING='1', expected '0' (set by the helper)")
    assert expect.reformed_in_process(spec, [good[0], reformed(1, device=0)], hooks, kept, 1) == (
        "worker 101 re-formed on cuda:0, expected cuda:1 (LOCAL_RANK)")
    assert expect.reformed_in_process(spec, good, hooks[:1], kept, 1) == (
        "worker 101: the pre-step hook did not run after the re-form")
    assert "GPU work still queued" in expect.reformed_in_process(spec, good, [hook(100), hook(101, idle=False)],
                                                                 kept, 1)
    dry = next(s for s in plan(["GPU-a", "GPU-b"], dry_run=True) if s.name == INPROCESS)  # cpu: no device, no stream
    cpu = [{**r, "device": None} for r in good]
    assert expect.reformed_in_process(dry, cpu, [hook(100, None, False), hook(101, None, False)], kept, 1) is None


def test_placement_across_nodes_nccl_needs_distinct_gpus_gloo_may_share_one() -> None:
    split_spec = plan(["GPU-a", "GPU-b"])[1]  # node-0 sees GPU-a, node-1 GPU-b, each cuda:0
    reports = [report("node-0", 0, "a", nproc=1, cvd="GPU-a"), report("node-1", 0, "b", nproc=1, cvd="GPU-b")]
    assert expect.placement(split_spec, reports, inherited=None) is None
    same = [reports[0], report("node-1", 0, "a", nproc=1, cvd="GPU-b")]
    assert expect.placement(split_spec, same, inherited=None) == "two ranks of an NCCL job on one GPU"
    shared_spec = plan(["GPU-a"])[1]  # one GPU, two nodes: gloo with CUDA tensors
    shared = [report("node-0", 0, "a", nproc=1, backend="gloo"), report("node-1", 0, "a", nproc=1, backend="gloo")]
    assert expect.placement(shared_spec, shared, inherited=None) is None
    dry = plan([], dry_run=True)[0]
    cpu = [report("node-0", r, None, cvd="0,1", backend="gloo", device=None, count=0) for r in (0, 1)]
    assert expect.placement(dry, cpu, inherited=None) is None


def test_memory_checks_foreign_contexts_and_the_baseline() -> None:
    reports = [report("node-0", 0, "GPU-a", pid=7), report("node-0", 1, "GPU-b", pid=8)]
    apps = [App(7, "GPU-a", 500), App(8, "GPU-b", 500), App(8, "GPU-a", 300), App(9, "GPU-a", 100)]
    assert expect.foreign(reports, apps) == {8: {"a"}}
    assert expect.strangers(reports, ["GPU-a"]) == {"b"}
    assert expect.over_baseline({"a": 900, "b": 50}, {"a": 4, "b": 4}, {"a", "b"}, margin=300) == {"a": 896}
    assert expect.over_baseline({"a": 200}, {"a": 4}, {"a", "missing"}, margin=300) == {}


def no_torch() -> dict:
    raise AssertionError("torch must not be probed when nothing runs")


def test_no_gpu_nothing_run_exit_0() -> None:
    said: list[str] = []
    assert check.main([], smi=Smi(binary=None), torch_probe=no_torch, environ={}, out=said.append) == 0
    assert said == ["no NVIDIA GPU found (nvidia-smi not on PATH); nothing run"]
    said.clear()
    assert check.main([], smi=smi_with(TWO), torch_probe=no_torch, environ={"CUDA_VISIBLE_DEVICES": ""},
                      out=said.append) == 0
    assert said == ["no NVIDIA GPU found (CUDA_VISIBLE_DEVICES='', nvidia-smi lists 2); nothing run"]


def test_list_shows_the_plan_for_the_visible_gpus() -> None:
    said: list[str] = []
    assert check.main(["--list", "--only", "kill-9"], smi=smi_with(TWO), torch_probe=no_torch, environ={},
                      out=said.append) == 0
    assert said == ["kill-9: nccl, world size 2, deadline 180s; node-0 --nproc-per-node gpu (-> 1) "
                    "CUDA_VISIBLE_DEVICES=GPU-aaaa-1, node-1 --nproc-per-node gpu (-> 1) CUDA_VISIBLE_DEVICES=GPU-bbbb-2"]
    said.clear()
    assert check.main(["--list"], smi=smi_with(TWO), torch_probe=no_torch,
                      environ={"CUDA_VISIBLE_DEVICES": "3,-1,5"}, out=said.append) == 0
    lines = said[0].splitlines()  # CUDA_VISIBLE_DEVICES=3,-1,5 shows one GPU (CUDA stops at -1)
    assert lines[0].startswith("nproc-gpu: nccl, world size 1") and "gloo (cuda tensors)" in lines[1]


def test_a_cpu_torch_beside_gpus_is_exit_2_with_the_way_out() -> None:
    said: list[str] = []
    cpu = {"torch": "2.13.0+cpu", "cuda": None, "available": False, "count": 0, "nccl": None}
    assert check.main([], smi=smi_with(TWO), torch_probe=lambda: cpu, environ={}, out=said.append) == 2
    assert "cannot use CUDA (torch.cuda.is_available() is False) while nvidia-smi lists 2 GPU(s)" in said[0]
    assert "bash tests/gpu/run.sh" in said[0]


@pytest.mark.parametrize("argv", [["--only", "kill-9,nope"], ["--budget", "0"]])
def test_bad_flags_are_usage_errors(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        check.parse_args(argv)
    assert exc.value.code == 2
    assert ("nope" in capsys.readouterr().err) == ("--only" in argv)


def test_run_sh_without_a_working_nvidia_smi_runs_nothing_and_exits_0(tmp_path: Path) -> None:
    broken = tmp_path / "nvidia-smi"
    broken.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver'\n"
                      "exit 9\n")
    broken.chmod(0o755)
    for smi, why in [(tmp_path / "absent", "nvidia-smi not on PATH"),
                     (broken, "nvidia-smi -L exited with code 9: NVIDIA-SMI has failed because it could not "
                              "communicate with the driver")]:
        done = subprocess.run(["bash", str(RUN_SH)], capture_output=True, text=True, timeout=30,
                              env={"PATH": "/usr/bin:/bin", "NVIDIA_SMI": str(smi)}, cwd=tmp_path)
        assert (done.returncode, done.stdout) == (0, f"no NVIDIA GPU found ({why}); nothing run\n"), done.stderr


def test_never_part_of_make_test() -> None:
    """pytest collects test_*.py: tests/gpu has none, and `make test` does not name it."""
    assert not list((ROOT / "tests" / "gpu").glob("test_*.py")) and not list((ROOT / "tests" / "gpu").glob("*_test.py"))
    makefile = (ROOT / "Makefile").read_text()
    test_recipe = makefile.split("\ntest:")[1].split("\n\n")[0]
    assert "gpu" not in test_recipe
    assert set(SCENARIOS) == {NPROC_GPU, KILL, INPROCESS, ELRUN, DRAIN}


class ScriptedSmi(Smi):
    """nvidia-smi as a sequence of answers: each query takes the next (the last one repeats)."""

    def __init__(self, gpus: list[list[Gpu]], apps: list[list[App]]) -> None:
        super().__init__("/usr/bin/nvidia-smi", run=None)
        self._gpus, self._apps = gpus, apps

    def gpus(self) -> list[Gpu]:
        return self._gpus.pop(0) if len(self._gpus) > 1 else self._gpus[0]

    def apps(self) -> list[App]:
        return self._apps.pop(0) if len(self._apps) > 1 else self._apps[0]


def scene_on(smi: Smi, baseline: dict[str, int]):
    from tests.gpu.scene import Context, Scene  # noqa: PLC0415 - the harness, only for these tests

    spec = plan(["GPU-a", "GPU-b"])[1]
    ctx = Context(smi, False, threading.Event(), float("inf"), baseline, lambda _text: None)
    scene = Scene(spec, ctx, Result(spec.name, spec.gpus, spec.label))
    scene.cluster.close()  # never started: only its temporary directory to remove
    return scene


def gone_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid  # reaped: no process has it now


def test_released_waits_for_compute_apps_to_drop_the_pids_and_the_memory_to_come_back() -> None:
    pid = gone_pid()
    used = [[Gpu(0, "GPU-a", "H100", mib, 81559)] for mib in (2000, 900, 304)]
    smi = ScriptedSmi(used, [[App(pid, "GPU-a", 1500)], [App(pid, "GPU-a", 1500)], []])
    scene = scene_on(smi, baseline={"a": 4})
    scene.released({pid}, {"a"}, "the old round's workers", cap=5)
    assert smi._apps == [[]] and smi._gpus == [used[-1]]  # it asked until both were back
    assert scene.holding({pid}) == set() and scene.over_baseline({"a"}) == {}


def test_memory_not_back_to_the_baseline_fails_with_the_gpu_and_how_much() -> None:
    leaked = ScriptedSmi([[Gpu(0, "GPU-a", "H100", 904, 81559), Gpu(1, "GPU-b", "H100", 10, 81559)]], [[]])
    scene = scene_on(leaked, baseline={"a": 4, "b": 4})
    with pytest.raises(Exception, match=r"after the scenario: GPU memory not released \(a \+900 MiB\)") as exc:
        scene.released(set(), {"a", "b"}, "after the scenario", cap=0.2, own=True)
    assert type(exc.value).__name__ == "Failed"
    pid = gone_pid()  # exited, but nvidia-smi still lists it (a context not yet torn down)
    stuck = ScriptedSmi([[Gpu(0, "GPU-a", "H100", 4, 81559)]], [[App(pid, "GPU-a", 500)]])
    with pytest.raises(Exception, match="no the old round: no pid of theirs in compute-apps within 0s"):
        scene_on(stuck, baseline={"a": 4}).released({pid}, set(), "the old round", cap=0.2)


def test_a_dry_run_checks_no_gpu_memory() -> None:
    from tests.gpu.scene import Context, Scene  # noqa: PLC0415

    spec = plan([], dry_run=True)[1]
    ctx = Context(Smi(binary=None), True, threading.Event(), float("inf"))
    scene = Scene(spec, ctx, Result(spec.name, spec.gpus, spec.label))
    scene.cluster.close()
    assert not scene.memory_checked and scene.holding({1, 2}) == set() and scene.over_baseline({"a"}) == {}
