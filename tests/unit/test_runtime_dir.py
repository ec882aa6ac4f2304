"""Control and progress files are node-local (issue 25): every rank rewrites its progress file
each step and the agent reads them ~40 times a second, which on the shared --log-dir (NFS,
Lustre) is a metadata storm at 1,000 nodes. They live in a private directory on this host,
gone when the agent leaves; logs stay under --log-dir."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from agent.daemon.workers.local import Layout, LocalWorkers
from rendezvous.clock import FakeClock
from rendezvous.state import Assignment, Member


def _group(*_args):  # no processes: the paths are what this test is about
    return SimpleNamespace(start=lambda: None, pids=[], poll=lambda: [None])


def test_control_and_progress_files_are_private_node_local_and_removed_at_exit(tmp_path: Path) -> None:
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    log_dir = tmp_path / "shared-log-dir"
    layout = Layout(("train.py",), 2, "node-a", "job", log_dir, None, 0, 1.0)
    local = LocalWorkers(layout, {"XDG_RUNTIME_DIR": str(runtime)}, FakeClock(), factory=_group)
    one = Assignment(1, (Member("node-a", "127.0.0.1", 2),), "127.0.0.1", 29500)
    files = []
    for number in (1, 2, 3):
        run = local.start(Assignment(number, one.members, one.master_addr, one.master_port))
        local.running = run
        files.append([run.control_file, *run.progress_files])
        assert all(runtime in p.parents and log_dir not in p.parents for p in files[-1])
        assert log_dir in run.attempt_dir.parents  # logs stay on the log dir
    private = files[0][0].parent.parent
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
    assert not files[0][0].exists() and files[2][0].exists()  # old attempts' files do not pile up
    local.local_files.close()  # what the agent's exit does (atexit)
    assert not private.exists()


def test_a_new_agent_removes_the_directories_of_agents_that_were_killed(tmp_path: Path) -> None:
    """An agent killed with SIGKILL cannot remove its directory; on tmpfs each restart would
    leave one more behind. The next agent on the node removes those whose owner is gone."""
    from agent.daemon.workers import runtime_dir

    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    environ = {"XDG_RUNTIME_DIR": str(runtime)}
    killed = runtime_dir.create("job", "node-a", environ)  # as if by an agent since killed
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    (killed / runtime_dir.OWNER).write_text(f"{pid} 12345\n")
    (killed / "attempt-1").mkdir()
    live = runtime_dir.create("job", "node-b", environ)  # its owner (this process) is alive
    other = runtime / "elastic-agent-notes"  # no owner record: not ours to judge
    other.mkdir()
    reused = runtime_dir.create("job", "node-c", environ)
    (reused / runtime_dir.OWNER).write_text(f"{os.getpid()} 1\n")  # our pid, another start time: a reused pid

    made = runtime_dir.create("job", "node-a", environ)

    assert not killed.exists() and not reused.exists()
    assert live.exists() and other.exists() and made.exists()
    assert (made / runtime_dir.OWNER).read_text().split()[0] == str(os.getpid())
