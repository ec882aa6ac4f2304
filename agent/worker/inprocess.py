"""Recovery in process: the workers survive a membership change (``Elastic.run``).

In synchronous data parallel training a peer's death breaks the step in flight before any
optimizer step, so every survivor still holds the same state of the last completed step:
there is nothing to reload from disk. So when the job re-forms, a worker does not exit:

1. Its process group breaks: a collective raises (the peer's sockets closed), or the agent
   tells it that the group is gone (a peer froze, nothing raises) and a watchdog thread
   releases the stuck collective. gloo cannot abort a collective that waits on a peer (its
   ``abort`` leaves the wait in place), so the group's connections are shut down under it
   (the sockets the group opened, never a listening one): the wait fails at once, and so do
   the peers that wait on us. Under NCCL the group is aborted. An optimizer pre-step hook
   refuses the step of a group we cut (an aborted collective may return garbage instead of
   raising), so a half step never reaches the weights.
2. It waits for its place in the next round from its agent (the control file's ``reform``),
   forms the new process group in process (no new interpreter, no new CUDA context), and
   every rank says which step it completed last: the most advanced rank broadcasts its
   state to the others, new ranks included. Only when no rank holds any state (the job's
   first start) is a checkpoint read from disk. A sharded model (FSDP2) takes another path
   (agent.worker.sharded_memory): rebuilt on the new mesh, its shards re-sharded from the
   rank files the nodes hold in memory.
3. It wraps the model for the new group and goes on at the next step.

A planned change (a node leaving, one joining) is announced as a step to stop after
(``stop_at``): every rank pauses exactly there, and the group re-forms without a failed
collective. The leaving node's workers exit there.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from agent.worker import control, groups, sharded_memory, snapshot
from agent.worker.held import HeldState

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.02  # how often the watchdog and a waiting worker read the control file
FORM_DELAY_ENV = "ELASTIC_AGENT_TEST_FORM_DELAY"  # tests only: see _test_delay


class Aborted(Exception):
    """The process group this step used was aborted: the step did not happen."""


class _Reforming:
    """The re-forming half of InProcess (which holds the state it uses): waiting for the next
    round's order, forming its group while a watchdog may cut it, agreeing on the state."""

    el: Any
    model: torch.nn.Module
    held: HeldState
    environ: Any
    round: int
    timeout: timedelta | None
    snapshots: Any
    ddp: Any
    _aborted: bool
    _stepped: int
    _lock: threading.Lock
    _forming: set[int] | None
    _group_sockets: set[int]

    def _cut(self) -> None:
        groups.release(self._group_sockets)

    def _group_gone(self, ask: control.Control) -> bool:
        # abort 0 is "none": under plain torchrun (no agent, round 0) nothing is ever gone
        return 0 < ask.abort >= self.round or (ask.reform is not None and ask.reform.round > self.round)

    def _why_gone(self, ask: control.Control) -> str:
        planned = ask.reform.planned_stop if ask.reform is not None else None
        if isinstance(planned, int) and self.held.completed >= planned:
            return f"a planned change after step {planned}"  # the re-form came before we read the stop
        return "the agent says the group is gone"

    # --- re-forming ------------------------------------------------------------------------
    def _reform(self, why: str) -> int:
        """Wait for our place in the next round, form its process group, agree on the state.
        Returns the step every rank now holds. A member lost while the group forms (it never
        comes, or dies in the agreement) does not end the worker: the agent orders a newer
        round, the watchdog cuts the half-formed group, and this rank forms the newer one."""
        broken = "failed" in why or "gone" in why
        self.el._report(self.held.completed, "broken" if broken else "paused")
        if broken:
            groups.tell_agent()
        began = time.monotonic()
        # Cut the old group at once (a peer still waiting on us fails now, not at the timeout),
        # and tear it down while the next round forms: destroying a gloo group takes ~0.2 s.
        self._cut()
        self.ddp = self.model
        teardown = threading.Thread(target=groups.drop_group, daemon=True, name="old-group-teardown")
        teardown.start()
        ask = self._wait_for_reform()
        teardown.join()
        gc.collect()
        while True:
            place = ask.reform
            assert place is not None
            try:
                held = self._form(place)
                break
            except Exception as exc:  # noqa: BLE001 - only a group that broke while forming is handled
                if not (groups.collective_failure(exc) or isinstance(exc, (OSError, TimeoutError))):
                    raise
                log.warning("round %d's process group broke while forming (%s); waiting for a newer round",
                            place.round, str(exc)[:200])
                self.el._report(self.held.completed, "broken")
                groups.tell_agent()
            finally:
                with self._lock:
                    self._forming = None
            self.ddp = self.model
            groups.drop_group()
            ask = self._wait_for_reform()
        log.info("re-formed in round %d as rank %d of %d in %.2fs (%s); going on after step %d", self.round,
                 dist.get_rank(), dist.get_world_size(), time.monotonic() - began, why, held)
        return held

    def _form(self, place: control.Reform) -> int:
        """Form round ``place.round``'s group and agree on the state. Until it is formed the
        watchdog cuts every connection opened meanwhile once a newer round is ordered (or
        this one aborted): the waits for a lost member fail at once, not at the timeout."""
        local_rank = int(self.environ.get("LOCAL_RANK", "0"))
        before = groups.connected_sockets()
        groups.prepare(os.environ, local_rank)
        self._adopt(place, local_rank)  # first: the watchdog judges "gone" against the new round
        with self._lock:
            self._forming = before
        _test_delay(self.environ)
        if place.rank(local_rank) != 0:
            groups.await_listener(place.master_addr, place.master_port,
                                  until=lambda: self._group_gone(self.el.control.read()))
        if self._group_gone(self.el.control.read()):
            raise groups.Aborted(f"round {place.round} was superseded before its group formed")
        dist.init_process_group(groups.backend(), init_method=f"tcp://{place.master_addr}:{place.master_port}",
                                rank=place.rank(local_rank), world_size=place.world_size, timeout=self.timeout)
        self._renew_side_groups()
        held = self._sync_and_wrap()
        self._group_sockets = groups.connected_sockets() - before
        return held

    def _renew_side_groups(self) -> None:
        """The helper's gloo side group (NCCL jobs) belonged to the old group: formed anew on
        first use in this one (a stale one would wait on the old members)."""
        self.el.agreement.drop()

    def _wait_for_reform(self) -> control.Control:
        while True:
            ask = self.el.control.read()
            if ask.reform is not None and ask.reform.round > self.round:
                return ask
            if ask.leave and ask.stop_at is not None:
                self.el._report(self.held.completed, "drained")
                self.el.exit_drained()
            time.sleep(WATCH_INTERVAL)

    def _adopt(self, place: control.Reform, local_rank: int) -> None:
        """The new round's ranks, where code that reads the torchrun variables finds them."""
        self.round = place.round
        self.el.round_number = place.round  # checkpoints of this round are fenced as such
        self.environ.update({
            "RANK": str(place.rank(local_rank)), "WORLD_SIZE": str(place.world_size),
            "LOCAL_WORLD_SIZE": str(place.local_world_size), "GROUP_RANK": str(place.group_rank),
            "GROUP_WORLD_SIZE": str(place.group_world_size), "ROLE_RANK": str(place.rank(local_rank)),
            "ROLE_WORLD_SIZE": str(place.world_size), "MASTER_ADDR": place.master_addr,
            "MASTER_PORT": str(place.master_port), "TORCHELASTIC_RESTART_COUNT": str(place.restart_count),
            "ELASTIC_AGENT_ROUND": str(place.round),
        })

    def _sync_and_wrap(self) -> int:
        """Every rank of the new group ends up with the state of the most advanced one."""
        if self.snapshots is not None:
            self.snapshots.serve(snapshot.local_address(self.environ.get("MASTER_ADDR", "127.0.0.1"),
                                                        int(self.environ.get("MASTER_PORT", "29500"))))
        # Only gloo groups are released by their connections (NCCL ones are aborted): an NCCL
        # job sends none, a gloo one a line per connection (world-size lines per rank).
        mine = ([local for local, _remote in groups.tcp_endpoints().values()] if dist.get_backend() == "gloo"
                else [])
        self._aborted = False  # a sharded agreement may run the optimizer once to initialise its state
        held = self.held.agree(self.el, self.snapshots, self.round, mine)
        self._stepped = -1
        self.model = self.held.model  # rebuilt on the new mesh when sharded
        self.ddp = self.model if self.held.sharded is not None else groups.wrap(self.model)
        self.el._report(held, "train")  # not broken any more; the agent clears steps from reports
        return held


class InProcess(_Reforming):
    def __init__(self, elastic: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 state: Callable[[], dict[str, Any]] | None, load_state: Callable[[dict[str, Any]], None] | None,
                 environ: dict[str, str] | None = None, snapshot_every: int | None = None,
                 timeout: timedelta | None = None, build_model: Callable[[], torch.nn.Module] | None = None) -> None:
        self.el = elastic
        self.timeout = timeout  # the collectives' timeout, the user's (None: torch's default)
        self.model = model
        self.held = HeldState(model, optimizer, state, load_state)
        self.environ = os.environ if environ is None else environ
        self.round = elastic.round_number or 0
        self.snapshots: Any = snapshot.from_env(self.environ, snapshot_every)
        if build_model is not None:  # a sharded model: every rank snapshots its shards
            self.held.sharded = sharded_memory.state_of
            self.snapshots = sharded_memory.from_env(self.environ, snapshot_every, build_model, self.round)
        self.ddp: Any = model
        self._current = -1  # the step in flight
        self._stepped = -1  # the last step whose optimizer.step ran
        self._aborted = False
        self._in_step = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._group_sockets: set[int] = set()
        self._forming: set[int] | None = None  # while a group forms: the connections made before it
        optimizer.register_step_pre_hook(self._before_optimizer_step)
        optimizer.register_step_post_hook(self._after_optimizer_step)

    # --- the loop --------------------------------------------------------------------------
    def run(self, train_step: Callable[[int, Any], Any], steps: int) -> None:
        self.el.mode = "inprocess"
        before: set[int] | None = groups.connected_sockets()
        local_rank = int(self.environ.get("LOCAL_RANK", "0"))
        changed = groups.prepare(os.environ, local_rank)
        if not (dist.is_available() and dist.is_initialized()):
            _test_delay(self.environ)
            dist.init_process_group(groups.backend(), init_method="env://", timeout=self.timeout)
        else:
            self.timeout = self.timeout or groups.group_timeout()  # the script's, kept at each re-form
            before = None  # which connections are the group's: those to a member (the agreement's endpoints)
            if changed and dist.get_backend() == "nccl":
                log.warning("the script formed its NCCL group with %s unset or other than %s: torch's watchdog "
                            "may tear this process down on a failure until the first re-form (form the group "
                            "after setting it, or let el.run form it)", ", ".join(changed),
                            groups.INPROCESS_ENV[changed[0]])
        step = self._sync_and_wrap() + 1
        self._group_sockets = (groups.group_sockets(groups.tcp_endpoints(), self.held.endpoints) if before is None
                               else groups.connected_sockets() - before)
        watchdog = threading.Thread(target=self._watch, daemon=True, name="reform-watchdog")
        watchdog.start()
        try:
            while step < steps:
                ask = control.await_clearance(self.el.control, step, until=self._group_gone)
                if ask.stop_at is not None and self.held.completed >= ask.stop_at:
                    step = self._planned_stop(ask) + 1
                    continue
                if self._group_gone(ask):
                    step = self._reform(self._why_gone(ask)) + 1
                    continue
                try:
                    self._one_step(train_step, step)
                except Exception as exc:  # noqa: BLE001 - only a broken group is handled here
                    if not groups.collective_failure(exc):
                        raise
                    if self._stepped == step:  # the weights moved: the step is done
                        self.held.completed = step
                    log.warning("step %d: the process group broke (%s); re-forming", step, str(exc)[:200])
                    step = self._reform("a collective failed") + 1
                    continue
                self.held.completed = step
                if self.snapshots is not None:
                    self.snapshots.after_step(step, self.round, self.held.state_dict())
                with self._collective(step):
                    self._after(step)
                step += 1
            self.el.finish()
        finally:
            self._stop.set()

    def _one_step(self, train_step: Callable[[int, Any], Any], step: int) -> None:
        with self._collective(step):
            train_step(step, self.ddp)
        if self._aborted:  # the collective returned, but from a group we aborted under it
            raise groups.Aborted(f"process group of round {self.round} aborted during step {step}")

    @contextmanager
    def _collective(self, step: int) -> Iterator[None]:
        """Code that may wait in a collective: the watchdog may abort the group under it."""
        with self._lock:
            self._current, self._in_step, self._aborted = step, True, False
        try:
            yield
        finally:
            with self._lock:
                self._in_step = False

    def _after(self, step: int) -> None:
        """Progress, and a periodic disk checkpoint (for whole-job restarts; collective)."""
        self.el._report(step, "train")
        every = self.el.checkpoint_every
        if every > 0 and (step + 1) % every == 0 and self.el.checkpoint_dir is not None and not self._aborted:
            try:
                self.el.save(step, self.held.state_dict())
            except Exception as exc:  # noqa: BLE001
                if not groups.collective_failure(exc):
                    raise
                log.warning("checkpoint of step %d interrupted: the process group broke", step)
        if self._aborted:
            log.warning("checkpoint of step %d interrupted: the process group was aborted", step)

    def _planned_stop(self, ask: control.Control) -> int:
        self.el._report(self.held.completed, "paused")
        if ask.leave:
            log.info("stopped after step %d: this node leaves the job", self.held.completed)
            if self.snapshots is not None:  # the others may need this step's snapshot (sharded: our shards)
                self.snapshots.wait_idle(30.0)
            self.el._report(self.held.completed, "drained")
            self.el.exit_drained()
        return self._reform(f"a planned change after step {ask.stop_at}")

    # --- hooks and the watchdog ------------------------------------------------------------
    def _before_optimizer_step(self, *_args: Any) -> None:
        groups.await_step_collectives(self.model)  # the flag below is only final once they ran
        if self.snapshots is not None:
            self.snapshots.before_update()
        if self._aborted:
            raise groups.Aborted(f"process group of round {self.round} aborted: this step's gradients are not whole")

    def _after_optimizer_step(self, *_args: Any) -> None:
        if self.snapshots is not None:  # sharded, every step: the copies first (raises if a rank is gone)
            self.snapshots.after_update(self._current, self.round, self.held)
        self._stepped = self._current  # only now is the step done: its survivors need not roll back

    def _watch(self) -> None:
        """Abort the group under a collective that waits for a peer which will never answer.
        Again on every poll while the step lasts: a collective started on the aborted group
        waits too, and each abort releases the one in flight."""
        reader = control.Reader(self.el.control_file)
        while not self._stop.wait(WATCH_INTERVAL):
            ask = reader.read()
            with self._lock:
                gone = self._group_gone(ask)
                stuck = self._in_step and gone
                first = stuck and not self._aborted
                if stuck:
                    self._aborted = True
                forming = self._forming if gone else None
            if first:
                log.warning("round %d's process group is gone: releasing step %d from it", self.round,
                            self._current)
                if self.snapshots is not None:  # an optimizer step may wait on a push to a node gone
                    self.snapshots.cancel_push()
            if stuck:
                self._cut()
            if forming is not None:  # a member was lost while the group formed: release the waits
                groups.release(groups.connected_sockets() - forming)


def _test_delay(environ: dict[str, str] | Any) -> None:
    """Test hook (``FORM_DELAY_ENV`` seconds): this rank comes late to the group it forms, so
    an end-to-end test can lose it while the others wait for it."""
    try:
        delay = float(environ.get(FORM_DELAY_ENV) or 0)
    except ValueError:
        return
    if delay > 0:
        log.warning("test hook: forming the process group in %.1fs", delay)
        time.sleep(delay)
