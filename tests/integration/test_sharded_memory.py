"""Sharded in-memory snapshots (agent.worker.sharded_memory) across a re-formed group: two real
processes, each its own "node" (its own snapshot directory and port), a gloo group formed
anew for each round as el.run does. They train an FSDP2 model with a snapshot after every
step, then:

1. re-form: each rebuilds the model on the new group and gets the state of the last step
   back exactly, with its own shards' files and the peer's copies;
2. every copy of one rank's file is corrupted: the load fails on that rank, and BOTH ranks
   resume from the same disk checkpoint (an older step), never a mix;
3. one rank's file is gone everywhere and no checkpoint exists: both ranks stop with the
   same clear error, never start over silently.

And apart: a snapshot whose shards are copied slowly, while the next step's forward and
backward passes run (they change BatchNorm's running statistics) and its optimizer step
waits, still holds exactly the state of the step it was taken after. With snapshots every
few steps, the state the ranks reached when the group re-forms is kept, not rolled back."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from agent.worker import Elastic, shard_store
from agent.worker import snapshot_wire as wire
from agent.worker.held import HeldState
from agent.worker.shard_store import SUBDIR
from agent.worker.sharded_memory import ShardedMemory, state_of

KEY = b"k" * 32
DEADLINE_S = 120.0


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def full(state: dict) -> dict:
    out = {}
    for name, value in sorted(state.items()):
        if isinstance(value, dict):
            out[name] = full(value)
        elif hasattr(value, "full_tensor"):
            out[name] = value.full_tensor().clone()
        elif isinstance(value, torch.Tensor):
            out[name] = value.clone()
    return out


def form(tmp: Path, round_number: int, rank: int, world: int = 2) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{tmp / f'store-{round_number}'}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=30))


def node_dir(tmp: Path, rank: int) -> Path:
    return tmp / f"node-{rank}"


def worker(rank: int, tmp: Path) -> None:
    out: dict = {"rank": rank}
    try:
        wire.write_key(node_dir(tmp, rank), KEY)
        form(tmp, 1, rank)
        model = build()
        held = HeldState(model, torch.optim.Adam(model.parameters(), lr=0.1))
        held.sharded = state_of
        memory = ShardedMemory(node_dir(tmp, rank), "job", 1, build, node=f"n{rank}", local_rank=0, local_world=1,
                               round_number=1)
        memory.serve("127.0.0.1")
        el = Elastic(tmp / "ckpt", checkpoint_every=0)
        assert memory.agree(held, el, 1, []) == -1
        saved = {}
        for step in range(3):
            one_step(held, memory, torch.randn(6, 4, generator=torch.Generator().manual_seed(step * 10 + rank)), step)
            held.completed = step
            memory.after_step(step, 1, held.state_dict())
            saved[step] = full(held.state_dict())
            if step == 1:
                el.save(step, held.state_dict())
        memory.before_update()

        form(tmp, 2, rank)  # 1. the same two ranks, a new group: state back from memory
        out["resumed"] = memory.agree(held, el, 2, [])
        out["exact"] = _same(saved[out["resumed"]], full(held.state_dict()))
        out["rebuilt"] = held.model is not model

        dist.barrier()  # 2. every copy of rank 1's file corrupted: both from disk
        if rank == 1:
            for node in (0, 1):
                for path in (node_dir(tmp, node) / SUBDIR).glob("shard-r1-s2-k1-of2"):
                    data = bytearray(path.read_bytes())
                    data[-3] ^= 0xFF
                    path.write_bytes(bytes(data))
        dist.barrier()
        form(tmp, 3, rank)
        out["fallback"] = memory.agree(held, el, 3, [])
        out["fallback_exact"] = _same(saved[out["fallback"]], full(held.state_dict()))

        dist.barrier()  # 3. rank 1's file gone everywhere, no checkpoint: a clear error on both
        if rank == 1:
            for node in (0, 1):
                for path in (node_dir(tmp, node) / SUBDIR).glob("shard-*-k1-of2"):
                    path.unlink()
        dist.barrier()
        form(tmp, 4, rank)
        out["error"] = agree_error(held, memory, 4)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the test
        out["traceback"] = traceback.format_exc()
    (tmp / f"out-{rank}.json").write_text(json.dumps(out))


def agree_error(held: HeldState, memory: ShardedMemory, round_number: int) -> str | None:
    """What a re-form without a checkpoint directory raises, as the user would read it (None: nothing)."""
    try:
        memory.agree(held, Elastic(None, checkpoint_every=0), round_number, [])
    except Exception as exc:  # noqa: BLE001 - what the user would read
        return str(exc)
    return None


def cadence_worker(rank: int, tmp: Path) -> None:
    """Snapshots every 3rd step; the group re-forms after step 4 (none taken since step 2)."""
    out: dict = {"rank": rank}
    try:
        wire.write_key(node_dir(tmp, rank), KEY)
        form(tmp, 1, rank)
        held = HeldState(build(), None)  # type: ignore[arg-type]
        held.optimizer = torch.optim.Adam(held.model.parameters(), lr=0.1)
        held.sharded = state_of
        memory = ShardedMemory(node_dir(tmp, rank), "job", 3, build, node=f"n{rank}", local_rank=0, local_world=1,
                               round_number=1)
        memory.serve("127.0.0.1")
        memory.agree(held, Elastic(None, checkpoint_every=0), 1, [])
        for step in range(5):
            one_step(held, memory, torch.randn(6, 4, generator=torch.Generator().manual_seed(step * 10 + rank)), step)
            held.completed = step
            out.setdefault("taken", []).append(memory.after_step(step, 1, held.state_dict()))
        reform_and_compare(tmp, rank, held, memory, full(held.state_dict()), out)
    except Exception:  # noqa: BLE001 - reported to the test
        out["traceback"] = traceback.format_exc()
    (tmp / f"out-{rank}.json").write_text(json.dumps(out))


def one_step(held: HeldState, memory: ShardedMemory, x: torch.Tensor, step: int) -> None:
    """A step as el.run runs it: forward, backward, the optimizer's pre-step hook, the update,
    its post-step hook (a snapshot every step: the copies, then every rank waits for all)."""
    held.model(x).pow(2).mean().backward()
    memory.before_update()
    held.optimizer.step()
    memory.after_update(step, 1, held)
    held.optimizer.zero_grad()


def reform_and_compare(tmp: Path, rank: int, held: HeldState, memory: ShardedMemory, saved: dict,
                       out: dict) -> None:
    """The same two ranks in a new group: the step they resume at, and whether it is ``saved``."""
    form(tmp, 2, rank)
    out["resumed"] = memory.agree(held, Elastic(None, checkpoint_every=0), 2, [])
    out["exact"] = _same(saved, full(held.state_dict()))
    dist.destroy_process_group()


def _same(a: dict, b: dict) -> bool:
    if sorted(a) != sorted(b):
        return False
    return all(_same(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) for k in a)


def slow_copy_worker(rank: int, tmp: Path) -> None:
    out: dict = {"rank": rank}
    try:
        copy_shards = shard_store.copy_shards

        def slowly(later, buffers):  # the copy overlaps the next step's forward and backward
            time.sleep(0.5)
            return copy_shards(later, buffers)

        shard_store.copy_shards = slowly
        wire.write_key(node_dir(tmp, rank), KEY)
        form(tmp, 1, rank)

        def with_norm() -> nn.Module:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
            for layer in (model[0], model[3]):
                fully_shard(layer)
            fully_shard(model)
            return model

        model = with_norm()
        held = HeldState(model, torch.optim.Adam(model.parameters(), lr=0.1))
        held.sharded = state_of
        # Every 2nd step: a copy behind the next step (every step, it is taken in the update's hook).
        memory = ShardedMemory(node_dir(tmp, rank), "job", 2, with_norm, node=f"n{rank}", local_rank=0,
                               local_world=1, round_number=1)
        memory.serve("127.0.0.1")
        memory.agree(held, Elastic(None, checkpoint_every=0), 1, [])
        saved = None
        for step in range(3):
            # One batch for both ranks: BatchNorm's statistics, unsharded, are then the same on
            # both, as a snapshot (and DCP) takes them: rank 0's copy for every rank.
            x = torch.randn(6, 4, generator=torch.Generator().manual_seed(step))
            held.model(x).pow(2).mean().backward()
            memory.before_update()  # what el.run's optimizer pre-step hook does
            if step == 2:
                break  # the group breaks here: step 2's optimizer step never runs
            held.optimizer.step()
            held.optimizer.zero_grad()
            held.completed = step
            memory.after_step(step, 1, held.state_dict())
            saved = full(held.state_dict())
        reform_and_compare(tmp, rank, held, memory, saved, out)
    except Exception:  # noqa: BLE001 - reported to the test
        out["traceback"] = traceback.format_exc()
    (tmp / f"out-{rank}.json").write_text(json.dumps(out))


def kill_worker(rank: int, tmp: Path) -> None:
    """The default cadence (every step, a peer that is no twin): rank 1's node dies in step 2,
    after its optimizer step, before its copy leaves (kill -9 in the push). Rank 0's optimizer
    step 2 runs; its post-step hook must not let step 2 end. Rank 0 goes on alone."""
    out: dict = {"rank": rank, "returned": []}
    try:
        if rank == 1:
            push = wire.push

            def die_in_step_2(address, head, *args, **kwargs):
                if head.get("step") == 2:
                    os._exit(9)
                return push(address, head, *args, **kwargs)

            wire.push = die_in_step_2
        wire.write_key(node_dir(tmp, rank), KEY)
        form(tmp, 1, rank)
        held = HeldState(build(), None)  # type: ignore[arg-type]
        held.optimizer = torch.optim.Adam(held.model.parameters(), lr=0.1)
        decay = torch.optim.lr_scheduler.StepLR(held.optimizer, step_size=1, gamma=0.5)  # stepped after the update
        held.extra, held.load_extra = decay.state_dict, decay.load_state_dict
        held.sharded = state_of
        memory = ShardedMemory(node_dir(tmp, rank), "job", None, build, node=f"n{rank}", local_rank=0,
                               local_world=1, round_number=1)
        memory.serve("127.0.0.1")
        memory.agree(held, Elastic(None, checkpoint_every=0), 1, [])
        out["sync"] = memory.sync
        saved, lrs = {}, {}
        try:
            for step in range(4):
                one_step(held, memory, torch.randn(6, 4, generator=torch.Generator().manual_seed(step * 10 + rank)),
                         step)
                decay.step()
                out["returned"].append(step)  # what a script prints: the step ended
                held.completed = step
                memory.after_step(step, 1, held.state_dict())
                saved[step], lrs[step] = full(held.state_dict()), held.optimizer.param_groups[0]["lr"]
        except Exception as exc:  # noqa: BLE001 - the collective that found rank 1 gone
            out["broke"] = str(exc)[:200]
        memory.cancel_push()
        form(tmp, 2, 0, world=1)
        out["resumed"] = memory.agree(held, Elastic(None, checkpoint_every=0), 2, [])
        out["exact"] = _same(saved[out["resumed"]], full(held.state_dict()))
        out["lr"], out["lr_then"] = held.optimizer.param_groups[0]["lr"], lrs[out["resumed"]]
        rest = node_dir(tmp, 0) / SUBDIR / "rest-r1-s1"  # the values step 1 left, kept apart: corrupt
        data = bytearray(rest.read_bytes())
        data[-2] ^= 0xFF
        rest.write_bytes(bytes(data))
        form(tmp, 3, 0, world=1)
        out["error"] = agree_error(held, memory, 3)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the test
        out["traceback"] = traceback.format_exc()
    (tmp / f"out-{rank}.json").write_text(json.dumps(out))


def run_two(tmp: Path, target, ranks: tuple[int, ...] = (0, 1)) -> list[dict]:
    """``target`` in two processes; the outcome of ``ranks`` (the others may die on purpose)."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, tmp)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(DEADLINE_S)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    outs = [json.loads((tmp / f"out-{rank}.json").read_text()) for rank in ranks]
    for out in outs:
        assert "traceback" not in out, out["traceback"]
    return outs


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_two(tmp_path_factory.mktemp("shards"), worker)


def test_a_snapshot_copied_behind_the_next_step_holds_the_step_it_was_taken_after(tmp_path: Path) -> None:
    outs = run_two(tmp_path, slow_copy_worker)
    assert [o["resumed"] for o in outs] == [1, 1]
    assert all(o["exact"] for o in outs), outs


def test_with_snapshots_every_few_steps_a_reformed_group_resumes_at_the_step_it_reached(tmp_path: Path) -> None:
    """The survivors keep their state as it is when the group re-forms: nothing rolls back to
    the last snapshot's step."""
    outs = run_two(tmp_path, cadence_worker)
    assert [o["taken"] for o in outs] == [[False, False, True, False, False]] * 2
    assert [o["resumed"] for o in outs] == [4, 4]
    assert all(o["exact"] for o in outs), outs


def test_a_reformed_group_gets_the_last_steps_shards_back_exactly(outcome: list[dict]) -> None:
    assert [o["resumed"] for o in outcome] == [2, 2]
    assert all(o["exact"] and o["rebuilt"] for o in outcome)


def test_a_corrupt_shard_sends_every_rank_to_the_same_disk_checkpoint(outcome: list[dict]) -> None:
    assert [o["fallback"] for o in outcome] == [1, 1]
    assert all(o["fallback_exact"] for o in outcome)


def test_a_shard_in_nobodys_memory_without_a_checkpoint_is_a_clear_error_on_every_rank(outcome: list[dict]) -> None:
    for out in outcome:
        assert out["error"] is not None and "sharded state is lost" in out["error"], out


def test_a_node_killed_before_its_copy_of_a_step_leaves_costs_no_step_that_ended(tmp_path: Path) -> None:
    """The default cadence with a peer that is no twin: the copies are made in the optimizer's
    post-step hook, and every rank waits for all of them, so no rank ends a step whose pieces
    are not on two nodes. The survivor rolls back its own update of the step in flight, and
    takes the learning rate as the last step that ended left it (after the scheduler's step)."""
    (out,) = run_two(tmp_path, kill_worker, ranks=(0,))
    assert out["sync"] and "broke" in out, out
    assert out["returned"] == [0, 1], out  # step 2's optimizer step ran here; the step did not end
    assert out["resumed"] == 1 and out["exact"], out
    assert out["lr"] == out["lr_then"] == 0.1 * 0.5 ** 2, out
    # Those values corrupt, no checkpoint on disk: a clear error, never a model with other values.
    assert out["error"] and "sharded state is lost" in out["error"] and "rest-r1-s1" in out["error"], out
