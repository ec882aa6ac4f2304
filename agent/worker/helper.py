"""The helper for training scripts: resume, periodic checkpoints, progress, and drain on request.

Only training scripts import this module (it imports torch); the agent never does. Adopting
it is a few lines::

    from agent.worker import Elastic

    el = Elastic(checkpoint_every=100, keep_last=3)
    start, state = el.load(default=lambda: {"model": model.state_dict(), "opt": opt.state_dict()})
    model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"])
    for step in range(start, total_steps):
        train_one_step(step)
        if el.step(step, lambda: {"model": model.state_dict(), "opt": opt.state_dict()}):
            el.exit_drained()   # checkpoint of `step` written, every rank agreed: exit code 75
    el.finish()

Under the agent, the environment (``agent.worker.protocol``) names the checkpoint directory, the
round (for fencing), this worker's progress file and this node's control file. Under plain
torchrun none of these exist: no progress is written, nothing is drained, and checkpoints
are written only when ``checkpoint_dir`` is passed explicitly.

Call ``load`` on every rank after ``torch.distributed.init_process_group`` (or without one,
single process): global rank 0 chooses the checkpoint and every rank loads that one. Call
``step`` at the same step on every rank. It runs no collective: a stop is announced to every
rank of the job as one step to stop after (the control file, agent.worker.control), so the
steady-state cost is one ``stat`` and one small file write per step.

For recovery in under a second, let the helper run the loop: ``el.run(train_step, model=...,
optimizer=..., steps=...)`` (agent.worker.inprocess). The workers then survive membership
changes: the broken process group is aborted, the new one formed in process, and the state
every survivor holds in memory carried over; new ranks get it from a survivor.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from agent.worker import checkpoint as ckpt
from agent.worker import choice, control, sharded
from agent.worker.protocol import (
    CHECKPOINT_DIR_ENV,
    CONTROL_FILE_ENV,
    DRAINED_EXIT_CODE,
    PROGRESS_FILE_ENV,
    PROGRESS_VERSION,
    ROUND_ENV,
)

__all__ = ["DRAINED_EXIT_CODE", "STATE_FILE", "Elastic", "WorkerConfigError"]

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # the one payload file of a checkpoint written by this helper

T = TypeVar("T")


class WorkerConfigError(ValueError):
    """An environment variable or argument of the helper has a value it cannot use."""


def _env_int(environ: Mapping[str, str], name: str, default: int | None) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise WorkerConfigError(f"{name} ({value!r}) must be an integer") from None


class Elastic:
    """One per worker process. See the module docstring for the loop it fits in."""

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        *,
        checkpoint_every: int = 0,
        keep_last: int | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        env = os.environ if environ is None else environ
        if checkpoint_every < 0:
            raise WorkerConfigError(f"checkpoint_every ({checkpoint_every}) must be >= 0 (0 = only on drain)")
        if keep_last is not None and keep_last < 1:
            raise WorkerConfigError(f"keep_last ({keep_last}) must be >= 1 or None (keep all)")
        directory = checkpoint_dir if checkpoint_dir is not None else env.get(CHECKPOINT_DIR_ENV) or None
        self.checkpoint_dir: Path | None = Path(directory) if directory is not None else None
        self.checkpoint_every = checkpoint_every
        self.keep_last = keep_last
        self.round_number: int | None = _env_int(env, ROUND_ENV, None)
        self.progress_file: Path | None = Path(env[PROGRESS_FILE_ENV]) if env.get(PROGRESS_FILE_ENV) else None
        self.control_file: Path | None = Path(env[CONTROL_FILE_ENV]) if env.get(CONTROL_FILE_ENV) else None
        self.control = control.Reader(self.control_file)
        self.mode = "plain"  # "inprocess" under run(): the agent keeps these workers across rounds
        self._env_rank = _env_int(env, "RANK", 0)
        self._env_world_size = _env_int(env, "WORLD_SIZE", 1)
        self._progress = _Progress(self.progress_file, clock, monotonic)
        self.agreement = Agreement()  # the group of the per-step agreement, made on first use
        self.last_saved_step: int | None = None
        self._last_step: int | None = None  # the last step reported, for finish()
        self._sharded: sharded.ShardedSaver | None = None  # made on the first sharded load or save

    # -- who we are ------------------------------------------------------------------------

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.distributed else int(self._env_rank or 0)

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if self.distributed else 1

    # -- resume ----------------------------------------------------------------------------

    def load(
        self, default: Callable[[], T] | T, *, map_location: Any = "cpu", **torch_load_kwargs: Any
    ) -> tuple[int, T]:
        """``(start_step, state)``: the step after the latest complete checkpoint and its state
        (``torch.load``), or ``(0, default)`` (``default()`` if callable) when there is none.

        Collective under a process group: call on every rank. Global rank 0 chooses the
        checkpoint (newest by round, then step; its file read once and its sha256 checked)
        and every other rank loads exactly that one (``agent.worker.choice``); the directory
        must be shared by all nodes. Under the agent, rank 0 also fences the directory
        against late saves of older rounds."""
        template = default() if callable(default) else default
        found = _load(self, template, map_location, torch_load_kwargs)
        if found is None:
            return 0, template
        checkpoint, state = found
        self.last_saved_step = checkpoint.step
        return checkpoint.step + 1, state

    # -- the per-step call -----------------------------------------------------------------

    def step(self, step: int, state_fn: Callable[[], Any], *, busy: float | None = None) -> bool:
        """Call after step ``step`` completed, at the same step on every rank.

        Reports progress, and reads the control file: when the job's ranks were asked to stop
        after this step (every rank of the job is told the same step, so no collective is
        needed to agree), or ``checkpoint_every`` says so, saves a checkpoint of ``step``
        (``state_fn()`` is evaluated on every rank, so collective state dicts such as FSDP's
        work; only global rank 0 writes). Returns True, identically on every rank, when the
        job must stop now: the checkpoint of ``step`` is then complete. ``busy``: see protocol."""
        self._report(step, "train", busy)
        stop_at = control.await_clearance(self.control, step + 1).stop_at
        drain = stop_at is not None and step >= stop_at
        if drain and step > stop_at:
            log.warning("asked to stop after step %d but step %d is done already (the request came late); "
                        "stopping now", stop_at, step)
        periodic = self.checkpoint_every > 0 and (step + 1) % self.checkpoint_every == 0
        if drain or periodic:
            if self.checkpoint_dir is not None:
                self.save(step, state_fn(), wait=drain)
            elif drain:
                log.warning("drain requested at step %d but no checkpoint directory is set "
                            "(%s unset, none passed): stopping without a checkpoint", step, CHECKPOINT_DIR_ENV)
        if drain:
            self._report(step, "drained")
            return True
        return False

    def run(self, train_step: Callable[[int, Any], Any], *, model: Any, optimizer: Any, steps: int,
            state: Callable[[], dict[str, Any]] | None = None,
            load_state: Callable[[dict[str, Any]], None] | None = None, snapshot_every: int | None = None,
            timeout: timedelta | None = None, build_model: Callable[[], Any] | None = None) -> None:
        """Run the training loop with recovery in process (see agent.worker.inprocess):
        ``train_step(step, ddp_model)`` is called for each step until ``steps``; extra state
        beyond the model and optimizer goes through ``state``/``load_state``. Under the agent,
        a snapshot of the state is kept in host memory and on a peer node every
        ``snapshot_every`` steps (0: never; default: every step, or every 10th for an HSDP
        model whose replica on another node stands for it; agent.worker.snapshot,
        agent.worker.sharded_memory). A sharded model's snapshot of every step is on the peer
        before ``optimizer.step()`` returns (no step that ended is lost); a sparser one is
        pushed behind the next step. ``timeout``: as
        init_process_group's (default: the script's group's, else torch's), at every re-form.
        A sharded model needs ``build_model`` (agent.worker.sharded_memory)."""
        from agent.worker.inprocess import InProcess  # noqa: PLC0415

        build = sharded.in_process_builder(model, build_model)
        InProcess(self, model, optimizer, state, load_state, None, snapshot_every, timeout, build).run(train_step, steps)

    def save(self, step: int, state: Any, *, wait: bool = True) -> None:
        """Checkpoint ``state`` as step ``step``: global rank 0 writes, every rank waits for it.
        Collective: call on every rank. A failed save (e.g. ``StaleCheckpointError``) raises on
        every rank, rank 0 with the original error.

        Sharded state (a DTensor/ShardedTensor in it) goes through DCP (agent.worker.sharded):
        every rank writes its shards. ``wait=False`` returns once they are in host memory; the
        next save, a drain or ``finish`` waits for it and raises its failure on every rank."""
        if self.checkpoint_dir is None:
            raise WorkerConfigError(
                f"cannot save step {step}: no checkpoint directory ({CHECKPOINT_DIR_ENV} unset, none passed)"
            )
        if sharded.is_sharded(state):
            self._note_saved(_sharded_saver(self).save(step, state, wait=wait))
            return
        failure: BaseException | None = None
        if self.rank == 0:
            try:
                saved = ckpt.save(self.checkpoint_dir, step, {STATE_FILE: lambda f: torch.save(state, f)},
                                  round_number=self.round_number)
                if self.keep_last is not None:
                    ckpt.keep_last(self.checkpoint_dir, self.keep_last, verified=saved)
            except Exception as exc:  # every rank must learn of it, or the others would wait forever
                failure = exc
        failed = self._agree(failure is not None)  # also the barrier: nobody goes on before the save is done
        if failure is not None:
            raise failure
        if failed:
            raise ckpt.CheckpointError(f"rank 0 failed to save the checkpoint of step {step} in {self.checkpoint_dir}")
        self._note_saved(step)

    def _note_saved(self, step: int | None) -> None:
        if step is not None:
            self.last_saved_step = step
            self._report(step, "checkpointed")

    def finish(self) -> None:
        """Training is over: a sharded save still in flight is waited for (collective), and the
        last progress report says so."""
        last = self._last_step
        if self._sharded is not None:
            self._note_saved(self._sharded.wait())
        if last is not None:
            self._report(last, "finished")

    def exit_drained(self) -> NoReturn:
        """End the process with ``DRAINED_EXIT_CODE`` (75): stopped at a step boundary on request,
        checkpoint written. Call on every rank after ``step`` returned True.

        Leaves with ``os._exit`` after flushing stdout, stderr and logging: tearing down a
        process group while a DDP module still holds it sometimes aborts the process in
        torch 2.13 ("terminate called without an active exception", exit -6), and the agent
        must see 75, not a crash. atexit handlers do not run; do your own cleanup first."""
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(DRAINED_EXIT_CODE)

    # -- internals -------------------------------------------------------------------------

    def _report(self, step: int, phase: str, busy: float | None = None) -> None:
        self._last_step = step
        self._progress.write(step, phase, self.mode, self.round_number, busy)

    def _agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (all_reduce MAX)."""
        return self.agreement.agree(flag) if self.distributed and dist.get_world_size() > 1 else flag


def _sharded_saver(el: Elastic) -> sharded.ShardedSaver:
    """The worker's one ``ShardedSaver``, made on first use (its DCP group is made collectively)."""
    if el._sharded is None:
        if el.checkpoint_dir is None:
            raise WorkerConfigError(f"no checkpoint directory ({CHECKPOINT_DIR_ENV} unset, none passed)")
        collective = el.agreement if el.distributed and el.world_size > 1 else None
        el._sharded = sharded.ShardedSaver(
            el.checkpoint_dir, el.round_number, el.keep_last, rank=el.rank, agree=el._agree,
            broadcast=collective.broadcast if collective is not None else (lambda obj: obj))
    return el._sharded


def _load(el: Elastic, template: Any, map_location: Any, torch_load_kwargs: Mapping[str, Any]) -> Any:
    """``load``'s (checkpoint, state) or None. Sharded state (FSDP2, DTensor) is loaded by DCP in
    place into ``template``, re-sharded onto this job's world size and mesh; replicated state
    is ``state.pt``, read once and ``torch.load``ed."""
    collective = el.agreement if el.distributed and el.world_size > 1 else None
    if sharded.is_sharded(template) and el.checkpoint_dir is not None:
        return _sharded_saver(el).load(template, collective)

    def deserialize(loaded: choice.Loaded) -> Any:
        return torch.load(io.BytesIO(loaded.payload[STATE_FILE]), map_location=map_location, **torch_load_kwargs)

    return choice.load_agreed(el.checkpoint_dir, el.round_number, rank=el.rank, names=(STATE_FILE,),
                              deserialize=deserialize, collective=collective)


class _Progress:
    """The worker's side of the progress file (agent.worker.protocol): one JSON record, replaced
    atomically after each step. Advisory (hang detection, metrics): a failed write is logged,
    never raised into training."""

    def __init__(self, path: Path | None, clock: Callable[[], float], monotonic: Callable[[], float]) -> None:
        self.path, self._clock, self._monotonic = path, clock, monotonic

    def write(self, step: int, phase: str, mode: str, round_number: int | None, busy: float | None) -> None:
        if self.path is None:
            return
        record = {"v": PROGRESS_VERSION, "step": step, "time": self._clock(), "mono": self._monotonic(),
                  "pid": os.getpid(), "phase": phase, "mode": mode, "round": round_number}
        record.update({} if busy is None else {"busy": float(busy)})
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            temp.write_text(json.dumps(record))
            os.replace(temp, self.path)
        except OSError as exc:
            log.warning("cannot write progress file %s: %s", self.path, exc)


class Agreement:
    """The helper's agreement group and what ``agent.worker.choice`` needs of it: the default
    group under gloo, a gloo side group under NCCL when there is one (keeping this tiny
    collective off the GPU stream). Made on first use; dropped when the group re-forms."""

    def __init__(self) -> None:
        self._group: Any = None
        self._device: torch.device | None = None

    def drop(self) -> None:
        self._group, self._device = None, None

    def _made(self) -> tuple[Any, torch.device]:
        if self._device is None:
            if dist.get_backend() == "gloo":
                self._group, self._device = None, torch.device("cpu")
            elif dist.is_gloo_available():
                # new_group is itself collective; every rank reaches its first step() together.
                self._group, self._device = dist.new_group(backend="gloo"), torch.device("cpu")
            else:
                self._group, self._device = None, torch.device("cuda", torch.cuda.current_device())
        return self._group, self._device

    def broadcast(self, obj: Any) -> Any:
        group, device = self._made()
        objects = [obj]
        dist.broadcast_object_list(objects, src=0, group=group, device=device)
        return objects[0]

    def agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (all_reduce MAX)."""
        group, device = self._made()
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return bool(value.item())
