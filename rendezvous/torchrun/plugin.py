"""torchrun on our etcd v3 rendezvous: ``torchrun --rdzv-backend etcd-v3`` (docs/torchrun-plugin.md).

torch registers it from the ``torchrun.handlers`` entry point (:func:`create_handler`); each of
torchrun's calls maps onto one :class:`~rendezvous.participant.Participant`:

- ``next_rendezvous``: join the current round or open the next (torchrun calls again only when
  its workers failed or we said the round moved on); hand back the round's group rank, member
  count, a c10d store in etcd (:mod:`rendezvous.torchrun.c10d_store`) and the master: group rank 0's
  address and reserved port (``use_agent_store`` is False: rank 0's workers host their TCPStore).
  A node still waiting to get in when the job succeeds ends with RendezvousGracefulExitError.
- ``num_nodes_waiting``, asked every ``--monitor-interval`` while workers run, is our tick: 1
  (restart the workers, not spending ``--max-restarts``) once the round moved on (a member went
  silent, a standby is let in, another node's workers failed) or our lease was lost.
- ``is_closed`` / ``set_closed``: the job's ``status`` key. ``shutdown`` (end of a run, never on
  a signal): a member of the current round closes the job, as torch's handlers do (succeeded if
  every member passed torchrun's exit barrier); a node that never got in only leaves.

Settings come from :mod:`rendezvous.torchrun.conf`. torch is imported only where torch's classes
are built: ``rendezvous/`` stays importable without it (tests/unit/test_layout.py).
"""

from __future__ import annotations

import atexit
import functools
import inspect
import logging
import os
import re
import secrets
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from rendezvous.clock import Clock, SystemClock
from rendezvous.errors import (
    CorruptStateError,
    JobFinishedError,
    LeaseLostError,
    RendezvousError,
    RendezvousTimeoutError,
    StoreConfigError,
    StoreUnavailableError,
)
from rendezvous.participant import Participant
from rendezvous.protocol.notices import NoticeKind
from rendezvous.reasons import Reason, reason_text
from rendezvous.state import Assignment, NodeRecord, Outcome, RoundState
from rendezvous.store import Store
from rendezvous.torchrun.c10d_store import RoundKeys, c10d_store
from rendezvous.torchrun.conf import BACKEND, PluginConfig, PluginConfigError, open_store, parse_config

__all__ = ["BACKEND", "EXIT_BARRIER_DONE", "PluginConfigError", "TorchrunRendezvous", "create_handler",
           "handler_class", "handler_for_torchrun", "make_handler", "parse_config"]

log = logging.getLogger(__name__)

# torchrun's exit barrier (torch.distributed.elastic.agent.server.api._TERMINAL_STATE_SYNC_ID):
# its last member writes this key once every agent's workers exited 0.
EXIT_BARRIER_DONE = "torchelastic/agent/terminal_state/last_member"
EXIT_BARRIER_COUNT = "torchelastic/agent/terminal_state/num_members"  # +1 per agent whose workers succeeded
START_RETRY_S = 1.0  # between tries to register while etcd does not answer yet


class EndedWhileWaitingError(JobFinishedError):
    """The job succeeded while this node waited to be let in (a standby): nothing to do, no
    failure (torch's RendezvousGracefulExitError)."""


def default_node_id() -> str:
    """Host, pid and a random suffix: unique even where containers share a host name and a pid."""
    host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())[:80].strip("-.") or "node"
    return f"{host}-{os.getpid()}-{secrets.token_hex(2)}"


class TorchrunRendezvous:
    """One torchrun agent's side, in our terms and without torch; the handler translates."""

    def __init__(self, config: PluginConfig, store: Store, *, node_id: str | None = None,
                 clock: Clock | None = None) -> None:
        self.config = config
        self.store = store
        self.clock = clock or SystemClock()
        self.node = NodeRecord(node_id or default_node_id(), config.addr, 1, host=socket.gethostname(),
                               version=f"torchrun {BACKEND}")
        self.participant = Participant(store, config.settings, self.node, clock=self.clock)
        self.keys: RoundKeys | None = None  # the current round's c10d keys
        self._served: int | None = None  # the last round this node was a member of
        self._started = False
        self._moved = False  # we told torchrun the round moved on: it is coming back, not failing
        self._lost = False  # our lease was lost: rejoin on the next rendezvous
        self._finished = False
        self._finished_member_left = False  # a member whose workers succeeded left: no more restarts
        self._lock = threading.Lock()
        atexit.register(_leave_at_exit, weakref.ref(self))

    @property
    def node_id(self) -> str:
        return self.node.node_id

    def next_assignment(self) -> Assignment:
        """Blocks until this node is a member of a closed round (see the module's docstring)."""
        with self._lock:
            deadline = self.clock.monotonic() + self.config.join_timeout
            while True:  # until assigned, the deadline passes, or the job is over
                try:
                    self._enter(deadline)
                    assignment = self._wait_for_round(deadline)
                    break
                except LeaseLostError as exc:
                    log.warning("%s: lease lost while waiting for a round (%s); rejoining", self.node_id, exc)
                    self._lost = True
                except JobFinishedError as exc:
                    raise self._ended(exc) from None
            self._moved = False
            self._served = assignment.round
            self.keys = RoundKeys(self.store, self.config.settings, assignment.round, self.clock)
            log.info("%s: round %d: group rank %s of %d (master %s:%d)", self.node_id, assignment.round,
                     assignment.group_rank(self.node_id), len(assignment.members), assignment.master_addr,
                     assignment.master_port)
            return assignment

    def _wait_for_round(self, deadline: float) -> Assignment:
        return self.participant.next_assignment(timeout=max(0.0, deadline - self.clock.monotonic()))

    def _ended(self, exc: JobFinishedError) -> JobFinishedError:
        """A job that succeeded while this node waited to get in (a standby, one that arrived
        while the round ran: torch's redundancy list, or one that arrived after the end, as the
        second agent of torch's test_launch_elastic_multiple_agents) ends it gracefully: the
        node has nothing to do and nothing failed. A failed job stays an error."""
        current = self.participant.current_round
        member = self._served is not None and current is not None and current.number == self._served
        if exc.outcome == Outcome.SUCCEEDED and not member:
            return EndedWhileWaitingError(exc.outcome, exc.reason)
        return exc

    def _enter(self, deadline: float) -> None:
        """Start, rejoin, or ask for the round after the one this node served."""
        p = self.participant
        if not self._started:
            self._until_etcd_answers(deadline, p.start)
            self._started = True
        elif self._lost or (p.session is not None and p.session.lost.is_set()):
            self._until_etcd_answers(deadline, p.rejoin)
            self._lost = False
        elif p.assignment is not None and not self._moved:
            p.request_new_round(reason_text(Reason.WORKER_FAILURE, f"torchrun on {self.node_id} restarts its workers"))

    def _until_etcd_answers(self, deadline: float, register: Callable[[float], None]) -> None:
        while True:
            try:
                register(max(0.0, deadline - self.clock.monotonic()))
                return
            except StoreUnavailableError as exc:
                if self.clock.monotonic() + START_RETRY_S >= deadline:
                    raise
                log.warning("%s: etcd not reachable (%s); retrying", self.node_id, exc)
                self.clock.sleep(START_RETRY_S)

    def num_nodes_waiting(self) -> int:
        """1 once torchrun should rendezvous again (the round moved on, or our lease was lost)."""
        if not self._lock.acquire(blocking=False):
            return 0  # a rendezvous is in progress
        try:
            if self.participant.assignment is None or self._finished or self._finished_member_left:
                return 0
            if self._moved:
                return 1
            notice = self.participant.poll(0)
            if notice is None or notice.kind not in (NoticeKind.ROUND, NoticeKind.LEASE_LOST):
                return 0
            if notice.kind is NoticeKind.ROUND and self.keys is not None and self.keys.check([EXIT_BARRIER_COUNT]):
                # A member left after its workers succeeded (it passed into torchrun's exit
                # barrier, which may time out at once: exit_barrier_timeout=0). Ours are not
                # restarted for that: they finish as they are, and the job ends after them.
                log.info("%s: %s, after its workers succeeded: this node's workers finish as they are",
                         self.node_id, notice.detail)
                self._finished_member_left = True
                return 0
            self._moved = True
            self._lost = notice.kind is NoticeKind.LEASE_LOST
            log.warning("%s: %s: torchrun restarts its workers for the next round", self.node_id, notice.detail)
            return 1
        finally:
            self._lock.release()

    def is_closed(self) -> bool:
        return self.store.get(self.config.settings.status_key)[0] is not None

    def close_job(self, why: str) -> None:
        """Record the job's outcome (the first one recorded stands)."""
        done = self.keys is not None and self.keys.check([EXIT_BARRIER_DONE])
        outcome = Outcome.SUCCEEDED if done else Outcome.FAILED
        detail = "every member passed torchrun's exit barrier" if done else "before every member's workers exited 0"
        status = self.participant.finish(outcome, f"rendezvous closed by torchrun on {self.node_id} ({why}), {detail}")
        log.info("%s: job %s: %s", self.node_id, status.outcome, status.reason)

    def shutdown(self) -> bool:
        """Close the job if this node is a member of the current round, then leave; False when
        the job could not be closed."""
        if not self._lock.acquire(timeout=self.config.settings.lease_ttl):
            log.warning("%s: shutdown while a rendezvous is in progress; leaving without closing", self.node_id)
            return False
        try:
            if self._finished:
                return True
            closed = True
            try:
                if self._should_close():
                    self.close_job("shutdown")
            except RendezvousError as exc:
                log.warning("%s: could not close the rendezvous: %s", self.node_id, exc)
                closed = False
            self._release()
            return closed
        finally:
            self._lock.release()

    def _should_close(self) -> bool:
        """Whether this node's shutdown records the job's outcome: when every member passed
        torchrun's exit barrier (succeeded, even if a round opened since), or as a member of
        the current round, unless this node passed into the barrier and others have not yet
        (a zero exit-barrier timeout): their workers still run, and the last one closes it."""
        if self.keys is None:
            return False
        if self.keys.check([EXIT_BARRIER_DONE]):
            return True
        if EXIT_BARRIER_COUNT in self.keys.added:
            log.info("%s: leaving before the other members' workers finished (exit barrier not passed by all); "
                     "the last of them records the outcome", self.node_id)
            return False
        return self._member_of_current_round()

    def _member_of_current_round(self) -> bool:
        assignment = self.participant.assignment
        if assignment is None:
            return False
        kv, _ = self.store.get(self.config.settings.round_key)
        current = RoundState.decode(kv.key, kv.value) if kv is not None else None
        return current is not None and current.number == assignment.round and not current.is_open

    def release(self, timeout: float = 1.0) -> None:
        """Leave without closing the job: at interpreter exit (a torchrun stopped by a signal
        skips shutdown), and in tests."""
        if self._lock.acquire(timeout=timeout):
            try:
                self._release()
            finally:
                self._lock.release()

    def _release(self) -> None:
        """Revoke our leases (peers see us gone at once) and close the etcd connection."""
        if self._finished:
            return
        self._finished = True
        try:
            self.participant.leave(None)
        except RendezvousError as exc:
            log.warning("%s: could not revoke its leases (%s); they expire on their own", self.node_id, exc)
        self.store.close()


def _leave_at_exit(ref: weakref.ref[TorchrunRendezvous]) -> None:
    core = ref()
    if core is not None:
        core.release()


# Ours -> torch's (torch.distributed.elastic.rendezvous.api), the first that matches.
_TORCH_ERRORS = ((EndedWhileWaitingError, "RendezvousGracefulExitError"), (JobFinishedError, "RendezvousClosedError"), (RendezvousTimeoutError, "RendezvousTimeoutError"),
                 (CorruptStateError, "RendezvousStateError"),
                 ((StoreUnavailableError, StoreConfigError), "RendezvousConnectionError"),
                 (RendezvousError, "RendezvousError"))


@contextmanager
def _torch_errors(api: Any) -> Iterator[None]:
    try:
        yield
    except RendezvousError as exc:
        name = next(name for kinds, name in _TORCH_ERRORS if isinstance(exc, kinds))
        raise getattr(api, name)(str(exc)) from exc


@functools.cache
def handler_class() -> type:
    """``EtcdV3RendezvousHandler``: built on first use, so importing this module does not import torch."""
    from torch.distributed.elastic.rendezvous import api  # noqa: PLC0415

    class EtcdV3RendezvousHandler(api.RendezvousHandler):
        """torch's RendezvousHandler on :class:`TorchrunRendezvous`."""

        def __init__(self, core: TorchrunRendezvous, run_id: str) -> None:
            self.core = core
            self._run_id = run_id

        def get_backend(self) -> str:
            return BACKEND

        @property
        def use_agent_store(self) -> bool:
            return False  # the store lives in etcd; workers start their own at MASTER_ADDR:MASTER_PORT

        def next_rendezvous(self) -> Any:
            with _torch_errors(api):
                assignment = self.core.next_assignment()
            rank = assignment.group_rank(self.core.node_id)
            assert self.core.keys is not None and rank is not None
            store = c10d_store(self.core.keys, self.core.config.store_timeout)
            master = api.RendezvousStoreInfo(assignment.master_addr, assignment.master_port)
            return api.RendezvousInfo(store, rank, len(assignment.members), master)

        def is_closed(self) -> bool:
            with _torch_errors(api):
                return self.core.is_closed()

        def set_closed(self) -> None:
            with _torch_errors(api):
                self.core.close_job("set_closed")

        def num_nodes_waiting(self) -> int:
            with _torch_errors(api):
                return self.core.num_nodes_waiting()

        def get_run_id(self) -> str:
            return self._run_id

        def shutdown(self) -> bool:
            return self.core.shutdown()

    return EtcdV3RendezvousHandler


def make_handler(params: Any, *, store: Store | None = None, environ: Mapping[str, str] = os.environ) -> Any:
    """A handler for torch's RendezvousParameters; raises PluginConfigError naming a bad value."""
    config = parse_config(params, environ)
    core = TorchrunRendezvous(config, store if store is not None else open_store(config))
    return handler_class()(core, params.run_id)


def handler_for_torchrun(params: Any) -> Any:
    """What torch's registry calls. Under the torchrun command a bad setting is one line on
    stderr and exit 2, not a traceback; called as a library (``elastic_launch`` inside a
    process) it raises PluginConfigError: a library never exits its caller's process."""
    try:
        return make_handler(params)
    except PluginConfigError as exc:
        if not _under_torchrun_command():
            raise
        print(f"torchrun --rdzv-backend {BACKEND}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _under_torchrun_command() -> bool:
    """Whether torchrun's command-line ``main`` (torch.distributed.run.main) is on our stack."""
    main = getattr(sys.modules.get("torch.distributed.run"), "main", None)
    code = getattr(inspect.unwrap(main), "__code__", None) if main is not None else None
    frame = sys._getframe(1)
    while frame is not None and code is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def create_handler() -> Callable[[Any], Any]:
    """The ``torchrun.handlers`` entry point: torch calls it without arguments and registers the
    creator it returns under the entry point's name (torch/distributed/elastic/rendezvous/registry.py)."""
    return handler_for_torchrun
