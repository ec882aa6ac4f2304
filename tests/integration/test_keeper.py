"""The keeper (agent.daemon.workers.keeper / keeper_main) with real processes: requests of any size,
exits told apart from a recycled pid's, and a zygote that could not be executed never taken
for one."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from agent.daemon.workers.keeper import Keeper

DEADLINE_S = 20.0


@pytest.fixture
def keeper() -> Iterator[Keeper]:
    k = Keeper()
    assert k.ready.wait(DEADLINE_S)  # it serves (and said so before any test's request)
    yield k
    k.process.kill()  # its workers die with it (PR_SET_PDEATHSIG)
    k.process.wait(timeout=DEADLINE_S)


def null_fds() -> tuple[int, int, int]:
    return (os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY), os.open(os.devnull, os.O_WRONLY))


def test_a_spawn_request_with_a_1_mib_environment_starts_the_worker(keeper: Keeper, tmp_path) -> None:
    # A large Kubernetes environment (service links, configs in variables): one datagram of
    # a SOCK_SEQPACKET socket holds ~208 KiB, the request is cut into several.
    env = {**os.environ, **{f"BIG_{i}": str(i % 10) * 65536 for i in range(16)}}
    out = tmp_path / "sizes"
    code = f"import os; open({str(out)!r}, 'w').write(str(sum(len(v) for k, v in os.environ.items() if k.startswith('BIG_'))))"
    worker = keeper.spawn([sys.executable, "-c", code], env, str(tmp_path), null_fds())
    assert worker.wait(timeout=DEADLINE_S) == 0
    assert out.read_text() == str(16 * 65536)


def test_an_exit_of_an_earlier_process_with_the_same_pid_is_not_the_workers(keeper: Keeper, tmp_path) -> None:
    worker = keeper.spawn([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), str(tmp_path),
                          null_fds())
    assert worker.start is not None
    # What the keeper reported for a dead worker that had this pid before (pids are recycled;
    # the exit table keeps every exit it was told).
    keeper.handle({"op": "exited", "pid": worker.pid, "start": worker.start - 1, "code": 7})
    assert worker.poll() is None
    os.kill(worker.pid, 9)
    assert worker.wait(timeout=DEADLINE_S) == -9


def test_a_zygote_whose_python_cannot_be_executed_is_never_ready_and_its_workers_run_plainly(
        keeper: Keeper, tmp_path) -> None:
    missing = "python-that-is-not-on-path"
    env = {**os.environ, "PATH": str(tmp_path)}
    keeper.become((missing, env))
    assert keeper.ready.wait(DEADLINE_S)
    assert not keeper.is_zygote and keeper.zygote is None
    # A fork asked for before that answer came runs the command plainly (never the script
    # inside the keeper's own bare interpreter, which has no torch).
    keeper.zygote = (missing, env)
    out = tmp_path / "ran"
    script = tmp_path / "script.py"
    script.write_text(f"import sys; open({str(out)!r}, 'w').write(sys.executable)\n")
    worker = keeper.spawn([sys.executable], dict(os.environ), str(tmp_path), null_fds(), run=[str(script)])
    assert worker.wait(timeout=DEADLINE_S) == 0
    assert out.read_text() == sys.executable


def test_a_zygote_still_importing_torch_leaves_as_soon_as_its_agent_is_gone(tmp_path) -> None:
    """A keeper pre-started for a later attempt reads its socket only after importing torch
    (seconds on a loaded machine); an in-process job that ended first left it running. It
    must leave within a fraction of that import time, without finishing it."""
    import socket
    import subprocess
    import time

    from agent.daemon.workers import keeper_main

    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch, torch._dynamo"], check=True)
    import_s = time.monotonic() - started

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen([sys.executable, keeper_main.__file__, str(theirs.fileno()), "--preload"],  # as Keeper runs a zygote
                            pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        time.sleep(0.05)  # not synchronisation: the agent goes while the keeper is still starting
        started = time.monotonic()
        ours.close()
        proc.wait(timeout=DEADLINE_S)
        gone_s = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert gone_s < import_s / 2, f"left {gone_s:.2f} s after its agent; importing torch takes {import_s:.2f} s"
