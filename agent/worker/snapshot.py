"""State kept in memory and on a peer (``Elastic.run``): a snapshot of the training state in
host memory every ``every`` steps, replicated to a rank on another node.

The in-process loop already keeps the state of the last completed step in every survivor's
memory, so a lost node costs nothing. What it cannot survive is losing *every* holder at
once: the whole job's workers restarted (an agent restarted by systemd, every worker of a
2-node job gone at the same time). Disk checkpoints cover that, but they are written every
``checkpoint_every`` steps and cost a filesystem round trip. So:

1. At a step boundary the state is copied to host memory (CUDA tensors: see below). That
   copy is the only work done in the training thread; if the previous snapshot is still
   being written, this step is skipped rather than queued (a slow disk or peer never stalls
   training).
2. A background thread serialises it and writes it to this node's snapshot directory in
   shared memory (``/dev/shm``: it outlives the worker process, not the machine), then sends
   it to its peer: local rank 0 of the next node in rank order, whose snapshot server
   stores it in *its* node's directory. A node lost with its memory is thus recovered from
   the peer's copy. The transport (agent.worker.snapshot_wire) is authenticated with the
   job's key and bounded; a snapshot is only ever loaded with ``weights_only=True``.
   Before the first write the node must have room for three copies (:meth:`Snapshots.fits`);
   without it snapshots are off on this node, said once.
3. When the ranks of a new process group agree on the state (agent.worker.held) and no
   rank holds any in memory (every worker is new), each node offers the newest complete
   snapshot in its directory, its own or a peer's copy; the newest one wins over the disk
   checkpoint when it is newer by (round, step), and its holder broadcasts it.

Only local rank 0 of each node takes snapshots: in data parallel training every rank holds
the same state, so one copy per node (and one on its peer) is enough: host memory of twice
the state per node. For CUDA tensors the copy runs on a side stream, overlapping the next
step's forward and backward passes; the next optimizer step waits for it on the GPU, never
the CPU.

A snapshot file is ``MAGIC``, one JSON line (job, round, step, size, crc32) and the
``torch.save`` payload; it is written to a temporary name and renamed, so a reader sees a
whole snapshot or none, and a file that fails its checks is skipped with a warning naming it.
A snapshot of a later round than the current one (left by an earlier job of the same id) is
never used.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from agent.worker import snapshot_wire as wire
from agent.worker.protocol import NODE_ID_ENV, OFF_FILE, SNAPSHOT_DIR_ENV

log = logging.getLogger(__name__)

MAGIC = b"ELASTIC-AGENT-SNAPSHOT 1\n"
# Bytes a node holds per snapshot it keeps: its own copy, the peer's copy, and a temporary
# file while either is replaced.
HELD_COPIES = 3


class SnapshotDir:
    """The snapshot files of one job on this node: ``own-<rank>`` and ``peer-<node>-<rank>``."""

    def __init__(self, path: Path, job: str) -> None:
        self.path = path
        self.job = job

    def write(self, name: str, header: dict[str, Any], payload: bytes) -> None:
        """Write one snapshot whole or not at all: on any error its temporary file goes."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        head = {**header, "job": self.job, "size": len(payload), "crc32": zlib.crc32(payload)}
        tmp = self.path / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + json.dumps(head).encode() + b"\n")
                f.write(payload)
            os.replace(tmp, self.path / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def room(self) -> int:
        """Bytes still free where the snapshots live (0 when that cannot be told)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = os.statvfs(self.path)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def held(self) -> int:
        """Bytes the snapshot files here take now (replacing them frees as much)."""
        total = 0
        try:
            for path in self.path.iterdir():
                if not path.name.startswith("."):
                    total += path.stat().st_size
        except OSError:
            pass
        return total

    def switch_off(self, why: str) -> None:
        """Tell the agent (and whoever looks) that snapshots are off on this node, and why."""
        try:
            (self.path / OFF_FILE).write_text(json.dumps({"v": 1, "why": why}) + "\n")
        except OSError:
            pass

    def read(self, path: Path) -> tuple[dict[str, Any], bytes] | None:
        """The header and payload of one snapshot file, or None (with a warning) when it is
        not a whole snapshot of this job."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("snapshot %s unreadable (%s); skipped", path, exc)
            return None
        end = data.find(b"\n", len(MAGIC))
        try:
            if not data.startswith(MAGIC) or end < 0:
                raise ValueError("not a snapshot file")
            head = json.loads(data[len(MAGIC):end])
            payload = data[end + 1:]
            if not isinstance(head, dict):
                raise ValueError("its header is not a JSON object")
            if head.get("job") != self.job:
                return None
            if len(payload) != head["size"] or zlib.crc32(payload) != head["crc32"]:
                raise ValueError(f"{len(payload)} bytes, header says {head['size']}, or its checksum differs")
            int(head["step"]), int(head["round"])
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            log.warning("snapshot %s is incomplete or corrupt (%s); skipped", path, exc)
            return None
        return head, payload

    def newest(self, max_round: int) -> tuple[dict[str, Any], bytes, Path] | None:
        """The newest whole snapshot by (round, step), as checkpoints are ordered, of a round
        no later than ``max_round``."""
        best: tuple[dict[str, Any], bytes, Path] | None = None
        try:
            paths = sorted(p for p in self.path.iterdir() if not p.name.startswith("."))
        except OSError:
            return None
        for path in paths:
            found = self.read(path)
            if found is None or int(found[0]["round"]) > max_round:
                continue
            if best is None or _key(found[0]) > _key(best[0]):
                best = (found[0], found[1], path)
        return best


def _key(head: dict[str, Any]) -> tuple[int, int]:
    return int(head["round"]), int(head["step"])


def to_host(obj: Any, stream: Any = None) -> Any:
    """A copy of ``obj`` whose tensors live in host memory and no longer change with training.
    CUDA tensors are copied into pinned memory on ``stream`` (a side stream that waited for
    the current one), so the copy overlaps the next step's forward and backward passes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.is_cuda:
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(stream)  # the allocator keeps its memory until the copy is done
            return host
        return t.clone()
    if isinstance(obj, dict):
        return {k: to_host(v, stream) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v, stream) for v in obj)
    return obj


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def local_address(master_addr: str, master_port: int) -> str:
    """This host's address on the route to the master (where peers can reach us)."""
    with socket.socket(socket.AF_INET6 if ":" in master_addr else socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((master_addr, master_port))  # UDP: picks the route, sends nothing
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class Snapshots:
    """Takes a snapshot every ``every`` steps and keeps it here and on the peer. One per node
    (its local rank 0): in data parallel training every rank holds the same state, and the
    ranks agree on one rank's state anyway (agent.worker.held)."""

    def __init__(self, store: SnapshotDir, every: int, node: str, local_rank: int, *,
                 key: bytes | None = None) -> None:
        self.store, self.every, self.node, self.local_rank = store, every, node, local_rank
        self.key = key  # the job's snapshot key; None: no peer transport (nothing served or sent)
        self.peer: str | None = None  # the peer's snapshot server, host:port
        self.server: wire.PeerServer | None = None
        self.off: str | None = None  # why snapshots are off on this node (see fits)
        self.taken = self.written = self.pushed = -1  # steps, for tests and logs
        self._busy = threading.Lock()
        self._stream: Any = None
        self._copied: Any = None  # the CUDA event of a copy the next optimizer step must wait for
        self._offered: tuple[dict[str, Any], bytes, Path] | None = None

    @property
    def address(self) -> str | None:
        return None if self.server is None else self.server.address

    def serve(self, host: str) -> str | None:
        """Start this node's snapshot server; None (nothing served) without the job's key."""
        if self.server is None and self.key is not None:
            self.server = wire.PeerServer(self._store_peer, host, job=self.store.job, key=self.key,
                                          max_bytes=lambda: 0 if self.off else self.store.room())
        return self.address

    def _store_peer(self, head: dict[str, Any], payload: bytes) -> None:
        name = f"peer-{_safe(head['node'])}-{head['local_rank']}"
        self.store.write(name, {"step": head["step"], "round": head["round"], "from": head["node"]}, payload)

    def fits(self, size: int) -> bool:
        """Whether this node can hold a snapshot of ``size`` bytes (its own copy, the peer's and
        a temporary file); when it cannot, snapshots are off, said once, and left so."""
        if self.off is None and self.store.room() + self.store.held() < HELD_COPIES * size:
            self.off = (f"{self.store.path} has {self.store.room()} bytes free, a snapshot needs "
                        f"{HELD_COPIES} x {size} bytes (own copy, peer's copy, temporary file)")
            log.warning("in-memory snapshots are off on this node: %s", self.off)
            self.store.switch_off(self.off)
        return self.off is None

    def choose_peer(self, addresses: list[str | None], rank: int) -> None:
        """The next snapshot server after ours in rank order (another node's), if any."""
        others = [(r, a) for r, a in enumerate(addresses) if a is not None and r != rank]
        later = [a for r, a in others if r > rank]
        self.peer = (later or [a for _, a in others] or [None])[0]

    # --- taking ----------------------------------------------------------------------------
    def after_step(self, step: int, round_number: int, state: Any) -> bool:
        """At a step boundary: start a snapshot of ``state`` (taken now) unless one is still
        being written. Returns whether one was started."""
        if (self.every <= 0 or self.off is not None or (step + 1) % self.every != 0
                or not self._busy.acquire(blocking=False)):
            return False
        began = time.monotonic()
        try:
            if torch.cuda.is_available() and self._stream is None:
                self._stream = torch.cuda.Stream()
            if self._stream is not None:
                self._stream.wait_stream(torch.cuda.current_stream())
            host = to_host(state, self._stream)
            if self._stream is not None:
                self._copied = torch.cuda.Event()
                self._copied.record(self._stream)
        except BaseException:
            self._busy.release()
            raise
        if self.taken < 0:
            log.info("first in-memory snapshot (step %d) taken in %.1f ms", step, 1000 * (time.monotonic() - began))
        self.taken = step
        header = {"step": step, "round": round_number, "node": self.node, "local_rank": self.local_rank}
        threading.Thread(target=self._keep, args=(host, self._copied, header, self.peer), daemon=True,
                         name="snapshot-writer").start()
        return True

    def after_update(self, step: int, round_number: int, held: Any) -> None:
        """Nothing: a survivor holds the whole replicated state, so no step waits on a copy."""

    def before_update(self) -> None:
        """Before an optimizer step: the weights may change only once the copy has them."""
        if self._copied is not None:
            torch.cuda.current_stream().wait_event(self._copied)
            self._copied = None

    def cancel_push(self) -> None:
        """Nothing: training never waits on this class's pushes (their deadline bounds them)."""

    def _keep(self, host: Any, copied: Any, header: dict[str, Any], peer: str | None) -> None:
        try:
            if copied is not None:
                copied.synchronize()
            buf = io.BytesIO()
            torch.save(host, buf)
            payload = buf.getvalue()
            if not self.fits(len(payload)):
                return
            self.store.write(f"own-{self.local_rank}", header, payload)
            self.written = header["step"]
            if peer is not None and self.key is not None:
                try:
                    wire.push(peer, header, payload, job=self.store.job, key=self.key)
                    self.pushed = header["step"]
                except OSError as exc:
                    log.debug("snapshot of step %d not sent to peer %s: %s", header["step"], peer, exc)
        except Exception:  # noqa: BLE001 - a failed snapshot must never break training
            log.warning("snapshot of step %d failed", header["step"], exc_info=True)
        finally:
            self._busy.release()

    def wait_idle(self, timeout: float) -> bool:
        """Wait for the snapshot being written (tests, and before a planned exit)."""
        if not self._busy.acquire(timeout=timeout):
            return False
        self._busy.release()
        return True

    # --- resuming --------------------------------------------------------------------------
    def offer(self, max_round: int) -> tuple[int, int] | None:
        """(round, step) of the newest whole snapshot on this node, own or a peer's copy, of a
        round no later than ``max_round``; it is kept until :meth:`take`."""
        self._offered = self.store.newest(max_round)
        if self._offered is None:
            return None
        head = self._offered[0]
        return int(head["round"]), int(head["step"])

    def take(self) -> dict[str, Any] | None:
        """The state of the snapshot offered last, or None (with a warning) if it cannot be loaded."""
        found, self._offered = self._offered, None
        if found is None:
            return None
        head, payload, path = found
        try:
            # Tensors and plain containers only: the file is in shared memory, and a peer's
            # copy came over the network; neither is ever unpickled.
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a bad file is skipped, never half loaded
            log.warning("snapshot %s cannot be loaded (%s); skipped", path, exc)
            return None
        log.info("resuming from the snapshot of step %d in %s", int(head["step"]), path)
        return state


def from_env(environ: Mapping[str, str], every: int | None) -> Snapshots | None:
    """The snapshots of this worker under the agent (``ELASTIC_AGENT_SNAPSHOT_DIR``), taken
    by local rank 0 only; None elsewhere, or when ``every`` is 0 (None: every step)."""
    every = 1 if every is None else every
    directory = environ.get(SNAPSHOT_DIR_ENV)
    if not directory or every <= 0 or environ.get("LOCAL_RANK", "0") != "0":
        return None
    store = SnapshotDir(Path(directory), environ.get("TORCHELASTIC_RUN_ID", ""))
    return Snapshots(store, every, environ.get(NODE_ID_ENV, "node"), 0, key=wire.read_key(Path(directory)))
