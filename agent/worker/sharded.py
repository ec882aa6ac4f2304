"""Disk checkpoints of sharded state (FSDP2, DTensor, ShardedTensor) through torch.distributed.checkpoint.

A sharded state dict holds only this rank's shards: written by global rank 0 alone (as the
replicated path does with ``state.pt``) it loses every other rank's shards, and loaded by
every rank it silently gives each one rank 0's shards. So when the state holds a DTensor or
ShardedTensor anywhere, the helper goes through DCP instead (see docs/architecture.md,
"Sharded state on disk"):

- Every rank stages its own shards into host memory, then DCP writes them, one file per rank,
  concurrently, in a background thread; the coordinator writes ``.metadata`` last. The staging
  copy runs in a thread too (a host buffer per rank, kept and reused between saves), overlapped
  with the next forward and backward; the next optimizer step waits for it (a global optimizer
  pre-step hook), so the weights never change under the copy. Tensors that are not sharded
  (buffers, counters: small, and a forward may update them) are copied before the call returns. All of it goes into ``.tmp-step_N-<token>`` (``FileSystemWriter`` fsyncs
  each file). DCP's background collectives run on a gloo group of their own, never on the
  training's.
- Global rank 0 commits when its save future resolves (every rank's part is then written,
  DCP gathers the write results before the metadata): the files are hashed from disk, the
  fence checked again, the directory renamed to ``step_N`` and the manifest written
  (``agent.worker.checkpoint.commit_dir``). The manifest is still the commit point.
- One save in flight: the next save, a drain and ``finish`` wait for it on every rank and
  agree on its outcome, so a failed save raises on every rank, never only on rank 0.
- Loading reuses the choice of ``agent.worker.choice`` (rank 0 hashes every file, skips a bad
  checkpoint for an older one, every rank loads the same), then ``dcp.load`` re-shards onto
  whatever world size and mesh the template state has.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.optim.optimizer import register_optimizer_step_pre_hook

from agent.worker import checkpoint as ckpt
from agent.worker import choice
from agent.worker.manifest import CheckpointError

log = logging.getLogger("agent.worker.checkpoint")

METADATA_FILE = ".metadata"  # DCP's name; the manifest allows exactly this dot name


NOT_IN_PROCESS = (
    "el.run needs build_model= for a sharded model (FSDP2/DTensor parameters): a function that builds the same "
    "model sharded on the current process group, which el.run calls after each re-form to re-shard the state "
    "onto the new mesh (docs/examples/train_fsdp.py)")


def in_process_builder(model: Any, build_model: Callable[[], Any] | None) -> Callable[[], Any] | None:
    """``el.run``'s ``build_model`` for a sharded ``model`` (None for a replicated one): it builds
    the same model sharded on the current default group, called after each re-form to re-shard
    the state onto the new mesh; ``train_step`` must use the model it is given."""
    if not module_is_sharded(model):
        return None
    if build_model is None:
        from agent.worker.helper import WorkerConfigError  # noqa: PLC0415 - helper imports this module

        raise WorkerConfigError(NOT_IN_PROCESS)
    return build_model


def rebuild(held: Any, build_model: Callable[[], torch.nn.Module]) -> None:
    """The model anew on the current mesh; the optimizer keeps its object (the script's
    references stay good), its parameters re-pointed in order and its state dropped."""
    model = build_model()
    params = list(model.parameters())
    groups = held.optimizer.param_groups
    if sum(len(g["params"]) for g in groups) != len(params):
        raise CheckpointError("build_model() returned a model with another number of parameters than the "
                              "optimizer's; it must build the same model")
    at = 0
    for group in groups:
        group["params"] = params[at:at + len(group["params"])]
        at += len(group["params"])
    held.optimizer.state.clear()
    held.model = model


def _sharded_types() -> tuple[type, ...]:
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    types: list[type] = [DTensor]
    try:
        from torch.distributed._shard.sharded_tensor import ShardedTensor  # noqa: PLC0415
        types.append(ShardedTensor)
    except ImportError:  # pragma: no cover - removed in some future torch
        pass
    return tuple(types)


def is_sharded(state: Any) -> bool:
    """True when ``state`` holds a DTensor or ShardedTensor anywhere (dicts, lists, tuples)."""
    types = _sharded_types()
    pending = [state]
    while pending:
        item = pending.pop()
        if isinstance(item, types):
            return True
        if isinstance(item, Mapping):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return False


def module_is_sharded(model: Any) -> bool:
    """True when a parameter or buffer of ``model`` is a DTensor (FSDP2, tensor parallel)."""
    types = _sharded_types()
    tensors = list(model.parameters()) + list(model.buffers())
    return any(isinstance(t, types) for t in tensors)


def _copy_unsharded(state: Any) -> Any:
    """``state`` with every tensor that is not sharded copied now: a buffer a forward updates in
    place (BatchNorm's running stats), a step counter. The sharded ones (parameters, optimizer
    moments), which only an optimizer step changes, are copied by the staging thread."""
    if isinstance(state, Mapping):
        return {key: _copy_unsharded(value) for key, value in state.items()}
    if type(state) in (list, tuple):
        return type(state)(_copy_unsharded(value) for value in state)
    if isinstance(state, torch.Tensor) and not isinstance(state, _sharded_types()):
        return state.detach().clone()
    return state


def _check_state(step: int, state: Any) -> None:
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(
            f"cannot save step {step}: sharded state must be a dict with string keys (e.g. {{'model': ..., "
            f"'opt': ...}}), found {type(state).__name__}")


class ShardedSaver:
    """The sharded saves of one worker: at most one in flight. Collective: every rank calls
    ``save`` and ``wait`` at the same steps."""

    def __init__(self, directory: Path, round_number: int | None, keep_last: int | None, *,
                 rank: int, agree: Callable[[bool], bool], broadcast: Callable[[Any], Any]) -> None:
        self.directory = directory
        self.round_number = round_number
        self.keep_last = keep_last
        self.rank = rank
        self._agree = agree
        self._broadcast = broadcast
        self._group: Any = None
        self._world: Any = None  # the default group ``_group`` was made in
        self._pending: tuple[int, Future, Future | None] | None = None  # step, DCP future, commit future
        self._stager: DefaultStager | None = None
        self._staging: Future | None = None  # the copy to host memory of the save in flight
        self._hook: Any = None

    def staged(self) -> None:
        """Wait until the save in flight has copied this rank's shards to host memory: after
        that the state may change. Called before every optimizer step and every save."""
        staging, self._staging = self._staging, None
        if staging is not None and staging.exception() is not None:
            # Not raised here, on one rank, inside an optimizer step: the upload future carries
            # the same failure, and wait() raises it on every rank.
            log.error("staging the sharded checkpoint failed: %s", staging.exception())

    def _stage_async(self) -> DefaultStager:
        if self._stager is None:
            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=True, use_non_blocking_copy=cuda))
            self._hook = register_optimizer_step_pre_hook(lambda *_: self.staged())
        return self._stager

    def group(self) -> Any:
        """A gloo group for DCP's collectives alone (made once, collectively): the background
        thread's gathers must never interleave with the training's collectives on one group."""
        if self._group is not None and self._world is not dist.group.WORLD:
            self._group = None  # made in a group since re-formed in process (el.run): formed anew
        if self._group is None and dist.is_initialized():
            self._group, self._world = dist.new_group(backend="gloo"), dist.group.WORLD
        return self._group

    def save(self, step: int, state: Mapping[str, Any], *, wait: bool) -> int | None:
        """Stage ``state`` (this rank's shards) and write it in the background; with ``wait``,
        return only once the checkpoint is committed. Returns the step of a save that this call
        found committed (the previous one, or this one with ``wait``), else None."""
        _check_state(step, state)
        done = self.wait()
        temp_name: str | None = None
        failure: Exception | None = None
        if self.rank == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                ckpt.refuse_if_stale(self.directory, self.round_number)
                temp_name = ckpt.temp_name(step)
            except Exception as exc:  # every rank must learn of it
                failure = exc
        if self._agree(failure is not None):
            if failure is not None:
                raise failure
            raise CheckpointError(f"rank 0 refused to start the checkpoint of step {step} in {self.directory}")
        temp = self.directory / self._broadcast(temp_name)
        writer = dcp.FileSystemWriter(temp, sync_files=True)
        response = dcp.async_save(_copy_unsharded(state), storage_writer=writer, process_group=self.group(),
                                  async_stager=self._stage_async())
        self._staging, future = response.staging_completion, response.upload_completion
        commit = self._commit_when_written(step, temp, future) if self.rank == 0 else None
        self._pending = (step, future, commit)
        if wait:
            done = self.wait()
        return done

    def _commit_when_written(self, step: int, temp: Path, future: Future) -> Future:
        commit: Future = Future()

        def run() -> None:
            try:
                future.result()
                saved = ckpt.commit_dir(self.directory, step, temp, round_number=self.round_number)
                if self.keep_last is not None:
                    ckpt.keep_last(self.directory, self.keep_last, verified=saved)
                commit.set_result(saved)
            except BaseException as exc:  # noqa: BLE001 - handed to every rank by wait()
                log.error("the sharded checkpoint of step %d in %s failed: %s", step, self.directory, exc)
                ckpt.discard(temp)
                commit.set_exception(exc)

        # Not a daemon: an interpreter leaving right after the last save still commits it.
        threading.Thread(target=run, name=f"commit-step-{step}").start()
        return commit

    def wait(self) -> int | None:
        """Wait for the save in flight, on every rank, and agree on its outcome: the step it
        committed, None when there was none; raises on every rank when it failed."""
        if self._pending is None:
            return None
        self.staged()
        step, future, commit = self._pending
        self._pending = None
        failure: BaseException | None = None
        try:
            future.result()
            if commit is not None:
                commit.result()
        except BaseException as exc:  # noqa: BLE001
            failure = exc
        if self._agree(failure is not None):
            if isinstance(failure, Exception):
                raise failure
            raise CheckpointError(f"rank {self.rank}: another rank failed to save the sharded checkpoint of "
                                  f"step {step} in {self.directory}; its own error says why")
        return step

    def load(self, template: Mapping[str, Any], collective: Any) -> tuple[ckpt.Checkpoint, Mapping[str, Any]] | None:
        """The checkpoint every rank resumes from (``choice.load_agreed``: chosen by rank 0, all
        agreed before anything collective happens) loaded into ``template``, or None."""
        self.group()  # collective: every rank makes it here, before any rank may fail
        found = choice.load_agreed(self.directory, self.round_number, rank=self.rank, names=(),
                                   deserialize=lambda loaded: loaded.checkpoint, collective=collective)
        if found is None:
            return None
        checkpoint = found[0]
        failure: Exception | None = None
        try:
            self.load_into(template, checkpoint)
        except Exception as exc:  # every rank must learn of it
            failure = exc
        if self._agree(failure is not None):
            if failure is not None:
                raise failure
            raise CheckpointError(f"rank {self.rank}: another rank could not load {checkpoint.path}; its own "
                                  f"error says why")
        return checkpoint, template

    def load_into(self, template: Mapping[str, Any], checkpoint: ckpt.Checkpoint) -> Mapping[str, Any]:
        """Load ``checkpoint`` into ``template`` in place (re-sharded to its layout) and return it."""
        if METADATA_FILE not in checkpoint.files:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} holds replicated state ({sorted(checkpoint.files)}), but the state "
                f"to load is sharded (DTensor/ShardedTensor); load it with the same kind of state it was saved from")
        reader = dcp.FileSystemReader(checkpoint.path)
        saved = set(reader.read_metadata().state_dict_metadata)
        wanted, _ = flatten_state_dict(dict(template))
        extra = sorted(saved - set(wanted))
        if extra:
            # DCP loads only the keys asked for: an optimizer whose state was never initialised
            # (opt.state_dict() before its first step) would silently keep fresh moments.
            raise CheckpointError(
                f"checkpoint {checkpoint.path} holds {len(extra)} entries the state to load lacks (e.g. "
                f"{extra[:3]}); build the state with torch.distributed.checkpoint.state_dict.get_state_dict("
                f"model, optimizer), which initialises the optimizer state, as docs/examples/train_fsdp.py does")
        dcp.load(template, storage_reader=reader, process_group=self.group())
        return template

