"""The keeper: one small process per agent that is the parent of every worker, so that no
worker outlives its agent, whatever wraps the trainer (``bash run.sh``, ``uv run``, a
launcher that forks and exits).

Run by the agent as ``python -S -I keeper_main.py FD`` with one end of a socket pair on FD;
standard library only, no agent imports (it starts in milliseconds and shares nothing).

With ``--preload`` (the agent's ``--prewarm`` and a ``python SCRIPT`` / ``python -m MODULE``
command) the keeper is also the node's *zygote*: run by the training command's own python,
it imports torch once, and a worker asked for with ``"run"`` is forked from it and runs the
script in the child as ``python SCRIPT ARGS`` would (``runpy``): no interpreter start, no
torch import, and the pages torch occupies are shared copy-on-write with every worker.

- It is a child subreaper (``PR_SET_CHILD_SUBREAPER``): whatever a worker forks and abandons
  is re-parented to the keeper, not to init, so it is still found below the keeper.
- It forks each worker on request: the child starts a new session, gets
  ``PR_SET_PDEATHSIG=SIGKILL`` (it dies if the keeper dies abruptly), takes the three file
  descriptors the agent sent (stdin, stdout, stderr) and execs the command.
- It reaps its children and reports every exit to the agent (``-N``: killed by signal N).
- When the agent goes away (the socket reaches end of file: a clean exit or a ``kill -9``),
  it SIGKILLs every process below it, waits for them, and exits.

Messages are JSON over SOCK_SEQPACKET, each cut into datagrams of at most ``CHUNK`` bytes
(:func:`send_message`: a datagram is capped by the socket buffer, ~208 KiB, and a worker's
environment on Kubernetes can be larger), file descriptors alongside the last (SCM_RIGHTS).
Agent -> keeper: ``{"op": "spawn", "id", "argv", "env", "cwd"}`` with 3 fds (and ``"run"``
for a zygote's fork). ``{"op": "become", "argv", "env"}``: exec that keeper program in place
(zygote <-> bare); ``argv[0]`` is found on the PATH of ``env``, as a shell would.
Keeper -> agent: ``{"op": "ready", "zygote"}`` once it serves (``"error"`` too when a
``become`` could not exec: it serves on as it was), ``{"op": "spawned", "id", "pid", "start"}``,
``{"op": "failed", "id", "error"}``, ``{"op": "exited", "pid", "start", "code"}``. A pid with
its start time (``/proc/PID/stat`` field 22) names one process: pids are recycled.
"""

import ctypes
import json
import os
import select
import signal
import socket
import sys
import threading

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
CHUNK = 1 << 15  # bytes of a message per datagram, well under any socket buffer
KILL_ROUNDS = 50  # each round SIGKILLs what is left and waits up to 0.1 s

_libc = ctypes.CDLL(None, use_errno=True)


def send_message(sock, payload, fds=()):
    """One message of any size: datagrams of ``CHUNK`` bytes, each led by ``+`` (more
    follows) or ``.`` (the last, which carries ``fds``). The caller sends nothing between."""
    count = max(1, -(-len(payload) // CHUNK))
    for i in range(count):
        last = i == count - 1
        datagram = (b"." if last else b"+") + payload[i * CHUNK:(i + 1) * CHUNK]
        if last and fds:
            socket.send_fds(sock, [datagram], list(fds))
        else:
            sock.send(datagram)


def receive_message(sock):
    """The next whole message and the fds that came with it; ``b""`` at end of file."""
    parts, fds = [], []
    while True:
        data, got, _flags, _addr = socket.recv_fds(sock, CHUNK + 1, 3)
        fds.extend(got)
        if not data:
            for fd in fds:
                os.close(fd)
            return b"", []
        parts.append(data[1:])
        if data[:1] == b".":
            return b"".join(parts), fds


def start_time(pid):
    """The process's start time in clock ticks since boot (None if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
        return int(stat[stat.rfind(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def send(sock, message):
    try:
        send_message(sock, json.dumps(message).encode())
    except OSError:
        pass  # the agent is gone; the main loop notices at its next read


def spawn(sock, request, fds):
    keeper = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != keeper:  # the keeper died before prctl took effect
                os._exit(137)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            os.closerange(3, 65536)
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):  # ignored ones survive exec
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.chdir(request["cwd"])
            argv = request["argv"]
            if "run" in request:
                if ZYGOTE:
                    os._exit(run_script(request["run"], request["env"]))
                argv = [*argv, *request["run"]]  # not a zygote (its exec failed): run it plainly
            os.execvpe(argv[0], argv, request["env"])
        except OSError as exc:
            os.write(2, f"cannot start worker command {request['argv'][0]!r}: {exc.strerror}\n".encode())
        finally:
            os._exit(127)
    for fd in fds:
        os.close(fd)
    send(sock, {"op": "spawned", "id": request["id"], "pid": pid, "start": start_time(pid)})


def run_script(args, env):
    """In a child forked from the zygote: what ``python ARGS`` would do. Returns the exit code."""
    import atexit
    import runpy
    import traceback

    os.environ.clear()
    os.environ.update(env)
    let_gloo_settle_before_destroy()
    code = 0
    try:
        if args[0] == "-m":
            sys.argv = args[1:]
            sys.path[0] = os.getcwd()
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter would print, then exit 1
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    return code


SETTLE_S = 0.05  # GIL-free time given to torch's gloo threads before a process group is destroyed


def let_gloo_settle_before_destroy():
    """Guard a forked worker against a deadlock in torch that its fast exit runs into.

    A gloo work thread (``pt_gloo_runloop``) drops its last reference to a finished
    collective a moment after completing it, and that drop takes the GIL: the work's
    thread-local state holds a Python object (the ``contextvars`` context autograd stashes
    during ``backward()``, so every DDP all-reduce carries one). ``ProcessGroupGloo``'s
    destructor joins those threads while holding the GIL. When the group dies within a few
    milliseconds of the last backward (PyTorch's DDP tutorial: ``destroy_process_group()``,
    then ``main()`` returns and drops the DDP model, whose reducer held the group's last
    reference), the destructor waits for the thread and the thread waits for the GIL:
    forever. A waiting thread gets the GIL only after the 5 ms switch interval, so the
    window is that wide. A cold interpreter rarely lands in it: its exit path collects
    garbage over every object torch created (tens of milliseconds); a worker forked from the
    zygote does not (``gc.freeze()``: its imports are never collected), so it got there
    first in 8 of 20 runs (gdb: the main thread in ``~ProcessGroupGloo`` -> ``join``, a
    ``pt_gloo_runloop`` thread in ``~AsyncWork`` -> ``take_gil``).

    The fix: ``destroy_process_group`` first sleeps ``SETTLE_S`` without the GIL, so every
    pending drop completes before any group can be destroyed, whether the group dies in it
    (the model was dropped first) or later with the model."""
    c10d = sys.modules.get("torch.distributed.distributed_c10d")
    dist = sys.modules.get("torch.distributed")
    original = getattr(c10d, "destroy_process_group", None)
    if original is None or getattr(original, "_elastic_agent_settles", False):
        return
    import functools
    import time

    @functools.wraps(original)
    def destroy_process_group(*args, **kwargs):
        time.sleep(SETTLE_S)  # no GIL held: the gloo threads drop their finished work
        return original(*args, **kwargs)

    destroy_process_group._elastic_agent_settles = True
    c10d.destroy_process_group = destroy_process_group
    if getattr(dist, "destroy_process_group", None) is original:
        dist.destroy_process_group = destroy_process_group


# What a training script's first steps import, slowest first: torch itself (~1-2 s), the
# compiler stack a torch.optim optimizer pulls in when it is first built (~1 s), the
# distributed package and the helper. Each is optional: a failure is the worker's to see.
PRELOAD = ("torch", "torch._dynamo", "torch.distributed", "torch.nn.parallel", "agent.worker.inprocess")


def preload():
    """The zygote's one slow thing, done once: import what the workers will need."""
    import gc
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001
            pass
    gc.collect()
    gc.freeze()  # what was imported stays shared: the children's collections never touch it


def preload_unless_orphaned(sock):
    """``preload``, but leave at once if the agent goes meanwhile. The import takes seconds on
    a loaded machine, and the socket is read only after it: a keeper pre-started for a later
    attempt outlived an in-process job that ended first (make demo's leftover check saw it)."""
    done = threading.Event()

    def watch():
        poller = select.poll()
        poller.register(sock.fileno(), 0)  # hang-up and errors only: requests wait for the main loop
        while not done.is_set():
            if poller.poll(100):
                kill_everything()  # children a ``become`` kept, if any
                os._exit(0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    preload()
    done.set()
    watcher.join()  # no thread is left when the zygote forks


def become(sock, request):
    """Exec another keeper program in place (the zygote of another python, or a bare
    keeper): the pid, the socket and the children stay, so no worker notices. The program
    is found on the PATH of its environment, as a shell finds ``python`` in an activated
    venv. If it cannot be executed the keeper serves on as it was and tells the agent so."""
    os.set_inheritable(sock.fileno(), True)
    signal.set_wakeup_fd(-1)
    try:
        os.execvpe(request["argv"][0], request["argv"], request["env"])
    except OSError as exc:
        os.set_inheritable(sock.fileno(), False)
        send(sock, {"op": "ready", "zygote": ZYGOTE,
                    "error": f"cannot exec {request['argv'][0]!r}: {exc.strerror or exc}"})


def reap(sock):
    """Report and reap every child that exited. Each is looked at before it is reaped
    (WNOWAIT), while its /proc entry still gives the start time that tells it from a later
    process with the same pid."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid == 0:
            return
        start = start_time(info.si_pid)
        try:
            pid, status = os.waitpid(info.si_pid, 0)
        except ChildProcessError:
            continue
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if sock is not None:
            send(sock, {"op": "exited", "pid": pid, "start": start, "code": code})


def descendants():
    """Every process below the keeper, found by walking parent links in /proc."""
    parents = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        parents[int(name)] = int(stat[stat.rfind(b")") + 2:].split()[1])
    below, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - below
        below |= frontier
    return below


def kill_everything():
    for _ in range(KILL_ROUNDS):
        left = descendants()
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        select.select([], [], [], 0.1)
        reap(None)


ZYGOTE = False  # this program imported torch (--preload): its forks run scripts in process


def main():
    global ZYGOTE
    sock = socket.socket(fileno=int(sys.argv[1]))
    ZYGOTE = "--preload" in sys.argv[2:]
    if ZYGOTE:
        preload_unless_orphaned(sock)
    send(sock, {"op": "ready", "zygote": ZYGOTE})
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the agent's going away ends the keeper
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    reap(sock)  # after a ``become``: children that exited while this program started
    while True:
        ready, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
        reap(sock)
        if sock not in ready:
            continue
        try:
            data, fds = receive_message(sock)
        except OSError:
            data, fds = b"", []
        if not data:  # the agent is gone
            break
        request = json.loads(data)
        if request.get("op") == "become":
            become(sock, request)
            signal.set_wakeup_fd(wake_w)  # the exec failed: serve on as we are
        if request.get("op") == "spawn":
            try:
                spawn(sock, request, fds)
            except OSError as exc:
                for fd in fds:
                    os.close(fd)
                send(sock, {"op": "failed", "id": request["id"], "error": exc.strerror or str(exc)})
    kill_everything()
    # Out at once, without the interpreter's teardown: as the zygote it holds torch, whose
    # teardown kept the keeper running after its agent had exited (0.26 s against 0.14 s idle,
    # longer beside a training job; make demo caught it). Nothing is left to flush: every write
    # went out with os.write or send.
    os._exit(0)


if __name__ == "__main__":
    main()
