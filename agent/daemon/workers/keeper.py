"""The agent's side of the keeper (agent.daemon.workers.keeper_main): start it, ask it to spawn
workers, learn their exits. A :class:`KeptProcess` answers ``pid``, ``poll()`` and ``wait()``
as a ``subprocess.Popen`` would, so the worker group does not care who the parent is."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from agent.daemon.workers.keeper_main import receive_message, send_message
from agent.errors import SpawnError

log = logging.getLogger(__name__)

KEEPER = Path(__file__).with_name("keeper_main.py")
Zygote = tuple[str, dict[str, str]]  # (the training command's python, the environment it imports torch in)
SPAWN_TIMEOUT_S = 60.0  # a zygote answers after its torch import, slow on a cold, loaded host
Identity = tuple[int, "int | None"]  # (pid, start time): pids are recycled, the pair is not


class KeptProcess:
    def __init__(self, keeper: Keeper, pid: int, start: int | None = None) -> None:
        self.keeper = keeper
        self.pid = pid
        self.start = start
        self.returncode: int | None = None
        self.stdin: IO[bytes] | None = None  # our end of its stdin, when it was given a pipe

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.keeper.exit_code((self.pid, self.start))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self.keeper.wait_exit((self.pid, self.start), timeout):
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        code = self.poll()
        assert code is not None
        return code


class Keeper:
    """One keeper process and the thread that reads its reports."""

    def __init__(self, zygote: Zygote | None = None) -> None:
        """``zygote``: (the training command's python, the environment torch is imported in)
        to make this keeper the node's zygote (keeper_main's ``--preload``)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._fd = theirs.fileno()
        self.zygote = zygote
        argv, env = self._image(zygote)
        try:
            self.process = subprocess.Popen(argv, pass_fds=(self._fd,), stdin=subprocess.DEVNULL,
                                            start_new_session=True, env=env)
        except OSError as exc:
            ours.close()
            raise SpawnError(f"cannot start the worker keeper: {exc.strerror or exc}") from exc
        finally:
            theirs.close()
        self._sock = ours
        self.ready = threading.Event()  # the keeper serves; as a zygote, once it imported torch
        self.is_zygote = False  # what the keeper said it runs as (``zygote`` is what was asked)
        self._cond = threading.Condition()
        self._exits: dict[Identity, int] = {}
        self._replies: dict[int, dict] = {}
        self._next_id = 0
        self._gone = False
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True, name="keeper-reports").start()

    @property
    def alive(self) -> bool:
        return not self._gone

    def _image(self, zygote: Zygote | None) -> tuple[list[str], dict[str, str]]:
        """The program the keeper runs: a bare interpreter, or the zygote of ``zygote``, whose
        python is found on the workers' PATH as a shell would (``python`` in a venv)."""
        if zygote is None:
            return [sys.executable, "-S", "-I", str(KEEPER), str(self._fd)], dict(os.environ)
        python, env = zygote
        if os.sep not in python:
            python = shutil.which(python, path=env.get("PATH", os.defpath)) or python
        return [python, str(KEEPER), str(self._fd), "--preload"], dict(env)

    def become(self, zygote: Zygote | None) -> None:
        """Turn the running keeper into the zygote of ``zygote``, or back into a bare keeper
        (``None``): it execs the other program in place, keeping its pid, its socket and
        every worker below it (a worker's parent never dies, so none is killed)."""
        if zygote == self.zygote or self._gone:
            return
        argv, env = self._image(zygote)
        before = self.zygote
        # Asked for before the request goes: the keeper's answer (read by another thread) may
        # come at once, and when its exec failed it resets this to None; set after, it was lost.
        self.zygote = zygote
        try:
            self.ready.clear()
            with self._send_lock:
                send_message(self._sock, json.dumps({"op": "become", "argv": argv, "env": env}).encode())
        except OSError as exc:
            log.debug("keeper gone before it could change: %s", exc)
            self.zygote = before

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str, fds: tuple[int, int, int],
              run: list[str] | None = None) -> KeptProcess:
        """Start ``argv``; with ``run`` (a zygote only) fork a child that runs ``python RUN``."""
        with self._cond:
            self._next_id += 1
            request_id = self._next_id
        request = {"op": "spawn", "id": request_id, "argv": argv, "env": env, "cwd": cwd}
        if run is not None:
            assert self.zygote is not None, "only a zygote runs scripts in process"
            request["run"] = run
        message = json.dumps(request).encode()
        try:
            with self._send_lock:
                send_message(self._sock, message, fds)
        except OSError as exc:
            raise SpawnError(f"cannot start worker command {argv[0]!r}: the keeper is gone ({exc})") from exc
        with self._cond:
            if not self._cond.wait_for(lambda: request_id in self._replies or self._gone, SPAWN_TIMEOUT_S):
                raise SpawnError(f"cannot start worker command {argv[0]!r}: the keeper did not answer")
            reply = self._replies.pop(request_id, None)
        if reply is None:
            raise SpawnError(f"cannot start worker command {argv[0]!r}: the keeper exited")
        if reply["op"] != "spawned":
            raise SpawnError(f"cannot start worker command {argv[0]!r}: {reply.get('error')}")
        return KeptProcess(self, int(reply["pid"]), reply.get("start"))

    def exit_code(self, worker: Identity) -> int | None:
        """The exit code of the worker (pid, start time) (negative: killed by that signal),
        None while it runs. If the keeper itself died, its workers died with it
        (PR_SET_PDEATHSIG=SIGKILL)."""
        with self._cond:
            return self._exits.get(worker, -9 if self._gone else None)

    def wait_exit(self, worker: Identity, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: worker in self._exits or self._gone, timeout)

    def _read(self) -> None:
        while True:
            try:
                data, fds = receive_message(self._sock)
            except OSError:
                data, fds = b"", []
            for fd in fds:  # the keeper sends none; never leak one
                os.close(fd)
            if not data:
                break
            self.handle(json.loads(data))
        with self._cond:
            self._gone = True
            self._cond.notify_all()
        if self.process.poll() is None or self.process.returncode != 0:
            log.debug("worker keeper ended (exit %s)", self.process.poll())

    def handle(self, message: dict) -> None:
        """One report of the keeper."""
        if message["op"] == "ready":
            self.is_zygote = bool(message.get("zygote"))
            if message.get("error"):
                log.warning("cannot pre-start workers (%s); starting them cold", message["error"])
                if not self.is_zygote:
                    self.zygote = None  # what it still is: spawns then run the command plainly
            self.ready.set()
            return
        with self._cond:
            if message["op"] == "exited":
                self._exits[(int(message["pid"]), message.get("start"))] = int(message["code"])
            else:
                self._replies[int(message["id"])] = message
            self._cond.notify_all()


_shared: Keeper | None = None
_shared_lock = threading.Lock()


_zygote: Zygote | None = None


def use_zygote(python: str, env: dict[str, str]) -> None:
    """From now on the shared keeper is a zygote of ``python`` (started, or changed in place,
    at once: it imports torch while the rendezvous runs)."""
    global _zygote
    _zygote = (python, dict(env))
    shared_keeper().become(_zygote)


def zygote_running() -> bool:
    with _shared_lock:
        return _shared is not None and _shared.alive and _shared.zygote is not None


def zygote_ready() -> bool:
    """The zygote runs and has imported what the workers need."""
    with _shared_lock:
        keeper = _shared
    return (keeper is not None and keeper.alive and keeper.zygote is not None and keeper.ready.is_set()
            and keeper.is_zygote)


def retire_zygote() -> None:
    """Give up the pre-started interpreter (the workers stay: the keeper changes in place)."""
    global _zygote
    _zygote = None
    with _shared_lock:
        keeper = _shared
    if keeper is not None and keeper.alive:
        keeper.become(None)


def shared_keeper() -> Keeper:
    """The keeper of this agent process, started on first use (and again if it died)."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.alive:
            _shared = Keeper(_zygote)
        return _shared
