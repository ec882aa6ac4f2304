"""The five scenarios of the GPU check, each a function of a :class:`Scene` that raises
:class:`Failed` with the reason when an expectation is not met.

- nproc-gpu: ``--nproc-per-node gpu`` on one node: one worker per visible GPU, LOCAL_RANK
  0..n-1, the agent's CUDA_VISIBLE_DEVICES unchanged, each worker on ``cuda:LOCAL_RANK``;
  the job finishes (exit 0) and its processes leave no GPU memory behind.
- kill-9: ``kill -9`` of a node's agent (a plain restart): its workers die with it and their
  CUDA contexts are torn down; the survivor's old workers are gone (their GPU memory
  released) before its next round trains; training resumes from the latest checkpoint.
- inprocess-kill-9: the same kill under ``train_ddp.py --inprocess``: the survivors keep
  their processes (so their CUDA contexts), re-form the group in process, lose no step;
  each re-formed with TORCH_NCCL_ASYNC_ERROR_HANDLING=0 (so NCCL's abort, not its watchdog),
  on cuda:LOCAL_RANK, and its pre-step hook waited for the stream (expect.reformed_in_process).
- inprocess-elrun-kill-9: the same, but the script leaves the group and the device to el.run
  (tests/gpu/worker.py, ``GPU_CHECK_HELPER_FORMS``): the group the kill breaks is one the
  helper formed with TORCH_NCCL_ASYNC_ERROR_HANDLING=0 after set_device(LOCAL_RANK), so the
  survivors' NCCL group is aborted by the helper (``_abort_process_group``), and a worker
  torn down by NCCL's own watchdog fails the check.
- sigterm-drain: SIGTERM to a node: it checkpoints CUDA state at a step boundary with the
  others, exits 3, and the rest resume at the next step (none lost).
"""

from __future__ import annotations

import signal
import time
import traceback

from agent.worker.checkpoint import latest_step
from tests.e2e.harness import AgentProc
from tests.gpu import expect
from tests.gpu.plan import (
    DRAIN,
    ELRUN,
    FAIL,
    INPROCESS,
    KILL,
    NPROC_GPU,
    PASS,
    SKIP,
    Result,
    Scenario,
    steps_lost,
)
from tests.gpu.scene import Context, Failed, Scene, Stopped, pid_alive

MIN_LEFT_S = 30.0  # a scenario is not started with less of the budget left
LOG_LINES = 30
TRAIN = ["--steps", "100000", "--checkpoint-every", "10", "--step-time", "0.1"]


def nproc_gpu(scene: Scene) -> None:
    node = scene.spec.nodes[0]
    agent = scene.start(node, min_nodes=1, max_nodes=1, train=["--steps", "30", "--checkpoint-every", "0"])
    scene.expect_running.discard(node.node_id)  # this job ends by itself
    scene.wait(lambda: agent.proc.poll() is not None, "end of the 30-step job")
    world = scene.spec.world_size
    steps = [entry for entry in scene.cluster.steps() if entry[2] == world]
    if agent.proc.returncode != 0 or not steps:
        raise Failed(f"the agent exited with code {agent.proc.returncode} after {len(steps)} steps at world "
                     f"size {world}, expected 0 after 30")
    reports = scene.first_reports()
    if not reports:
        raise Failed(f"{len(scene.reports())} of {node.expected_nproc} workers formed a process group")
    scene.check_placement(reports)
    scene.released({r["pid"] for r in reports}, set(), "the finished job's workers")
    devices = ",".join(str(r["device"]) for r in sorted(reports, key=lambda r: r["local_rank"]))
    where = f"cuda:{{{devices}}}" if scene.spec.device == "cuda" else "cpu"
    scene.result.note(f"{len(reports)} workers, LOCAL_RANK 0..{len(reports) - 1} on {where}, "
                      f"first step {steps[0][0] - scene.t0:.1f}s after start, exit 0")


def _pair(scene: Scene, *extra: str) -> tuple[AgentProc, AgentProc]:
    """Both nodes training at the full world size; returns (victim, survivor): the victim is
    group rank 1 (rank 0 moving is the e2e suite's test)."""
    for node in scene.spec.nodes:
        scene.start(node, min_nodes=1, max_nodes=2, train=[*TRAIN, *extra])
    world = scene.spec.world_size
    scene.wait(lambda: scene.cluster.first_step_after(scene.t0, world_size=world), f"training at world size {world}")
    scene.check_placement(scene.wait(scene.first_reports, "a report from every worker", cap=30))
    agents = list(scene.agents.values())
    scene.wait(lambda: all(a.group_rank() is not None for a in agents), "both nodes' group ranks", cap=10)
    victim = next(a for a in agents if a.group_rank() == 1)
    survivor = next(a for a in agents if a is not victim)
    scene.say(f"training at world size {world}; {victim.node_id} is group rank 1")
    return victim, survivor


def _world_of(scene: Scene, agent: AgentProc) -> int:
    return next(n.expected_nproc for n in scene.spec.nodes if n.node_id == agent.node_id)


def _resumed(scene: Scene, at: float, survivor: AgentProc) -> tuple[int, int]:
    """Wait for training at the survivor's size; record recovery and steps lost. Returns
    (the last completed step, the first step trained again)."""
    world = _world_of(scene, survivor)
    resumed = scene.wait(lambda: scene.cluster.first_step_after(at, world_size=world),
                         f"training resumed at world size {world}")
    scene.result.recovery_s = resumed[0] - at
    completed, first, lost = steps_lost(scene.cluster.steps(), at, world)
    scene.result.steps_lost = lost
    scene.say(f"resumed at step {first} (last completed {completed}) after {resumed[0] - at:.2f}s")
    if completed is None or first is None:
        raise Failed("no step line before the event")
    return completed, first


def _old_round_released(scene: Scene, old: set[int], what: str) -> None:
    """Nothing of the old round runs or holds GPU memory now that the new one trains."""
    running = {p for p in old if pid_alive(p)}
    if running:
        raise Failed(f"{what} {sorted(running)} still running while the new round trains")
    holding = scene.holding(old)
    if holding:
        raise Failed(f"{what} {sorted(holding)} still hold GPU memory while the new round trains")


def _victim_gpus_back(scene: Scene, victim: AgentProc) -> None:
    """On a node split, the victim's GPUs are its own: back to the baseline soon after."""
    if scene.spec.nodes[0].cuda_visible is None or scene.ctx.dry_run:
        return
    scene.released(set(), scene.gpus_of_node(victim.node_id), f"{victim.node_id}'s GPUs", cap=20)
    scene.result.note(f"{victim.node_id}'s GPUs back to the baseline")


def kill_plain(scene: Scene) -> None:
    victim, survivor = _pair(scene)
    scene.wait(lambda: latest_step(scene.cluster.checkpoint_dir) is not None, "a first checkpoint")
    scene.pause(0.5)
    checkpoint = latest_step(scene.cluster.checkpoint_dir)
    doomed = {r["pid"] for r in scene.of(victim.node_id)}
    old = {r["pid"] for r in scene.of(survivor.node_id)}
    scene.expect_running.discard(victim.node_id)
    at = time.monotonic()
    victim.kill_node()
    scene.say(f"kill -9 of {victim.node_id} (checkpoint of step {checkpoint})")
    scene.wait(lambda: not any(pid_alive(p) for p in doomed), "the killed node's workers to die with it", cap=15)
    _completed, first = _resumed(scene, at, survivor)
    if checkpoint is not None and first < checkpoint:
        raise Failed(f"resumed at step {first}, below the checkpoint of step {checkpoint}")
    _old_round_released(scene, doomed | old, "workers of the old round")
    scene.result.note(f"resumed from the checkpoint of step {first - 1}; the old round's processes gone"
                      + (", none in compute-apps" if scene.memory_checked else ""))
    _victim_gpus_back(scene, victim)


def kill_inprocess(scene: Scene) -> None:
    victim, survivor = _pair(scene, "--inprocess")
    kept = scene.of(survivor.node_id)
    foreign_before = scene.foreign(kept)
    kept_pids, first_round = {r["pid"] for r in kept}, kept[0]["round"]
    if scene.spec.name == ELRUN and any(r.get("nccl_async_error_handling") != "0" for r in kept):
        raise Failed(f"el.run formed the first group with TORCH_NCCL_ASYNC_ERROR_HANDLING other than 0: {kept}")
    doomed = {r["pid"] for r in scene.of(victim.node_id)}
    scene.pause(1.0)
    scene.expect_running.discard(victim.node_id)
    at = time.monotonic()
    victim.kill_node()
    scene.say(f"kill -9 of {victim.node_id}")
    scene.wait(lambda: not any(pid_alive(p) for p in doomed), "the killed node's workers to die with it", cap=15)
    _completed, _first = _resumed(scene, at, survivor)
    later = [r for r in scene.reports() if r["node"] == survivor.node_id and r["round"] > first_round]
    strangers = {r["pid"] for r in later} - kept_pids
    gone = {p for p in kept_pids if not pid_alive(p)}
    if strangers or gone:
        raise Failed(f"the survivor's workers were replaced (pids {sorted(gone)} gone, {sorted(strangers)} new): "
                     "a plain restart, not in process")
    scene.wait(lambda: {r["pid"] for r in scene.reports() if r["node"] == survivor.node_id
                        and r["round"] > first_round} == kept_pids, "every survivor re-forming in process", cap=15)
    if scene.result.steps_lost:
        raise Failed(f"{scene.result.steps_lost} completed steps trained again, expected 0")
    scene.wait(lambda: {h["pid"] for h in scene.hooks() if h["round"] > first_round} >= kept_pids,
               "every survivor's pre-step hook in the new round", cap=15)
    problem = expect.reformed_in_process(scene.spec, scene.reports(), scene.hooks(), kept_pids, first_round)
    if problem:
        raise Failed(problem)
    scene.result.note("re-formed with TORCH_NCCL_ASYNC_ERROR_HANDLING=0" + (
        ", on cuda:LOCAL_RANK, the pre-step hook waited for the stream" if scene.spec.device == "cuda" else ""))
    held = scene.holding(kept_pids)
    context = ", their CUDA contexts still hold memory" if held == kept_pids and held else ""
    scene.result.note(f"survivors kept their pids {sorted(kept_pids)}{context}")
    foreign = {pid: gpus - foreign_before.get(pid, set()) for pid, gpus in scene.foreign(kept).items()}
    foreign = {pid: gpus for pid, gpus in foreign.items() if gpus}
    if foreign:  # not wrong, but memory on a GPU that is another rank's: say so
        scene.result.note("WARNING after re-forming, ranks hold memory on GPUs not theirs: " + ", ".join(
            f"pid {pid} on {','.join(g[:8] for g in sorted(gpus))}" for pid, gpus in sorted(foreign.items())))
    _old_round_released(scene, doomed, "the killed node's workers")
    _victim_gpus_back(scene, victim)


def drain(scene: Scene) -> None:
    victim, survivor = _pair(scene)
    scene.pause(1.0)
    leaving = {r["pid"] for r in scene.of(victim.node_id)}
    old = {r["pid"] for r in scene.of(survivor.node_id)}
    scene.expect_running.discard(victim.node_id)
    at = time.monotonic()
    victim.signal(signal.SIGTERM)
    scene.say(f"SIGTERM to {victim.node_id}")
    scene.wait(lambda: victim.proc.poll() is not None, f"{victim.node_id} to leave", cap=90)
    if victim.proc.returncode != 3:
        raise Failed(f"{victim.node_id} exited with code {victim.proc.returncode}, expected 3 (left cleanly)")
    _resumed(scene, at, survivor)
    if scene.result.steps_lost:
        raise Failed(f"{scene.result.steps_lost} completed steps trained again, expected 0")
    _old_round_released(scene, leaving | old, "workers of the old round")
    scene.result.note(f"{victim.node_id} exited 3 after a checkpoint at the step boundary; the old round's "
                      "processes gone" + (", none in compute-apps" if scene.memory_checked else ""))
    _victim_gpus_back(scene, victim)


FLOWS = {NPROC_GPU: nproc_gpu, KILL: kill_plain, INPROCESS: kill_inprocess, ELRUN: kill_inprocess, DRAIN: drain}


def run_one(spec: Scenario, ctx: Context) -> Result:
    result = Result(spec.name, spec.gpus, spec.label)
    if spec.why:
        result.note(spec.why)
    if ctx.stop.is_set():
        result.outcome = SKIP
        result.notes.insert(0, "interrupted before it started")
        return result
    if ctx.budget_end - time.monotonic() < MIN_LEFT_S:
        result.outcome = SKIP
        result.notes.insert(0, "not started: the run's --budget is spent")
        return result
    scene = Scene(spec, ctx, result)
    pids: set[int] = set()
    gpus: set[str] = set()
    try:
        with scene:
            try:
                FLOWS[spec.name](scene)
                result.outcome = PASS
            except Failed as exc:
                result.fail(str(exc))
            finally:
                reports = scene.reports()
                pids, gpus = {r["pid"] for r in reports}, scene.every_gpu()
                if scene.apps_visible(pids) is False:
                    result.note("compute-apps listed none of our pids (another PID namespace?): "
                                "memory checked by memory.used only")
        # Closed (every process killed by pid): nothing of ours may hold GPU memory any more.
        scene.expect_running.clear()
        try:
            scene.released(pids, gpus, "after the scenario", own=True)
        except Failed as exc:
            if result.outcome == PASS:
                result.fail(str(exc))
            else:
                result.note(str(exc))
    except Stopped:
        result.fail("interrupted")
    except Exception as exc:  # noqa: BLE001 - a bug or a broken machine: the table still prints
        result.fail(f"{type(exc).__name__}: {exc}")
        result.logs.append(traceback.format_exc())
    if result.outcome == FAIL:
        for agent in scene.agents.values():
            lines = [line.text for line in agent.lines[-LOG_LINES:]]
            result.logs.append(f"--- {spec.name}: {agent.node_id} (exit {agent.proc.poll()}), last {len(lines)} "
                               "console lines ---\n" + "\n".join(lines))
    scene.say(f"{result.outcome}" + (f": {result.notes[0]}" if result.outcome != PASS else ""))
    return result
