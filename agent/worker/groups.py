"""Process groups for the in-process loop: forming, releasing and dropping one. Torch only.

gloo cannot abort a collective that waits on a peer (its ``abort`` leaves the wait in
place), so a group is released by shutting down the connections it opened (never a
listening socket, so its accept thread does not die): the wait fails at once, and so does
every peer that waits on us. NCCL groups are aborted.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from agent.worker.protocol import AGENT_PID_ENV

log = logging.getLogger(__name__)

# How long a re-forming rank probes for rank 0's store before init_process_group takes over
# the wait (with the user's timeout). Never a collective's timeout: those stay the user's.
LISTENER_PROBE_S = 60.0


class Aborted(Exception):
    """The process group this step used was released under it: the step did not happen."""


def collective_failure(exc: BaseException) -> bool:
    """A broken process group, not a bug in the training step."""
    if isinstance(exc, Aborted) or isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        mark in text for mark in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Broken pipe",
                                  "ProcessGroup", "process group"))


# In-process mode needs the NCCL group aborted by us, not by torch: with asynchronous error
# handling on (the agent's default for plain scripts, torch's own default too) NCCL's watchdog
# tears the process down on a failed or timed-out collective, which is what a restart wants
# and what recovery in process must avoid (torch's _abort_process_group says it needs 0).
# Read by ProcessGroupNCCL when a group is constructed, so set before any group forms.
INPROCESS_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}


def prepare(environ: Any, local_rank: int, cuda: Any = None) -> list[str]:
    """Before a group forms in process: this rank's GPU is the current device (NCCL and
    DDP use the current device; without it every local rank would share GPU 0) and the
    environment is the in-process one. Returns the variables it changed (a group formed
    earlier by the script was built with their old values)."""
    cuda = torch.cuda if cuda is None else cuda
    if cuda.is_available() and local_rank < cuda.device_count():  # else: one GPU per process, already chosen
        cuda.set_device(local_rank)
    changed = [name for name, value in INPROCESS_ENV.items() if environ.get(name) != value]
    environ.update(INPROCESS_ENV)
    return changed


def await_step_collectives(model: torch.nn.Module) -> None:
    """Block until the GPU work queued so far (the step's gradient all-reduce) completed. DDP
    hands the CPU back before an NCCL all-reduce ran on the GPU; deciding on the CPU that
    the step may be applied before then would let an all-reduce cut under it be applied."""
    if torch.cuda.is_available() and any(p.is_cuda for p in model.parameters()):
        torch.cuda.current_stream().synchronize()


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def wrap(model: torch.nn.Module) -> Any:
    if dist.get_world_size() == 1:
        return model
    on_gpu = next(model.parameters()).is_cuda if any(True for _ in model.parameters()) else False
    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if on_gpu else None)


def tell_agent() -> None:
    try:
        os.kill(int(os.environ[AGENT_PID_ENV]), signal.SIGUSR1)
    except (KeyError, ValueError, OSError):
        pass  # no agent to tell (plain torchrun): nothing waits on it either


def group_timeout() -> timedelta | None:
    """The collective timeout of the default group the script formed itself (None: torch's
    default). The helper re-forms with the same: a rank that is slow (an evaluation on rank
    0, a long save, a recompile) is not a failure (DESIGN invariant 8); a dead peer is the
    agent's to notice (etcd presence), not a timeout's."""
    if not dist.is_initialized():
        return None
    try:
        group = dist.distributed_c10d._get_default_group()
        device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        timeout = group._get_backend(device).options._timeout
    except Exception:  # noqa: BLE001 - a private API: torch's default when it moved
        return None
    return timeout if isinstance(timeout, timedelta) else None


def await_listener(host: str, port: int, timeout: float = LISTENER_PROBE_S,
                   until: Callable[[], bool] = lambda: False) -> None:
    """Until rank 0's store listens. torch's store client backs off a whole second after a
    refused connection, and the ranks of a new round start within milliseconds of each
    other: probing first keeps that second off every recovery. Raises ``Aborted`` once
    ``until`` holds (the round was superseded: rank 0 may never come)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until():
            raise Aborted(f"gave up waiting for rank 0's store at {host}:{port}: the round was superseded")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.005)


def connected_sockets() -> set[int]:
    """This process's connected (not listening) socket descriptors."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=int(name))
        except OSError:
            continue
        try:
            if sock.type == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                found.add(int(name))
        except OSError:
            pass
        finally:
            sock.detach()
    return found


Endpoint = tuple[str, int]


def _endpoint(address: Any) -> Endpoint:
    # An IPv4 peer of a dual-stack socket reads as ::ffff:a.b.c.d on one side only.
    host = str(address[0])
    return (host[7:] if host.startswith("::ffff:") else host, int(address[1]))


def tcp_endpoints() -> dict[int, tuple[Endpoint, Endpoint]]:
    """This process's connected TCP sockets: descriptor -> (local, remote) endpoint."""
    found = {}
    for fd in connected_sockets():
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                found[fd] = (_endpoint(sock.getsockname()), _endpoint(sock.getpeername()))
        except (OSError, IndexError, ValueError):
            pass  # closed or not connected any more
        finally:
            sock.detach()
    return found


def group_sockets(sockets: dict[int, tuple[Endpoint, Endpoint]], members: set[Endpoint]) -> set[int]:
    """Which of ``sockets`` belong to the group: those connected to a member, i.e. whose
    remote endpoint is a local endpoint of a member's socket (``members``: every rank's local
    endpoints, this one's too, for pairs within this host). A connection to anything else (a
    metrics push, a data loader's server) is not the group's and is never cut."""
    return {fd for fd, (_local, remote) in sockets.items() if remote in members}


def drop_group(abort: bool = False) -> None:
    """``abort``: abort the default group (NCCL: unblocks a stuck collective). Otherwise
    destroy it, which closes its connections (an aborted group cannot be destroyed)."""
    if not dist.is_initialized():
        return
    if abort:
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception as exc:  # noqa: BLE001 - an already broken group may refuse
            log.debug("abort of the process group: %s", exc)
        return
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001
            log.debug("destroy of the process group: %s", exc)



def release(group_sockets: set[int]) -> None:
    """Release whatever waits on the current group: shut its connections (gloo), abort it (NCCL)."""
    if dist.is_initialized() and dist.get_backend() != "gloo":
        drop_group(abort=True)
        return
    for fd in group_sockets:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.detach()  # the group owns the descriptor; it closes it when destroyed
