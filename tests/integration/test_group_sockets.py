"""Which connections a rank cuts to release its group, when the script formed the group itself
(el.run did not see it form): only the group's. Two real ranks form a gloo group on
127.0.0.1, each also holds a connection to a server of this test (a metrics push, a data
loader's server); rank 1 freezes, rank 0's all-reduce waits on it, and rank 0 releases the
group the way el.run does (the endpoints exchanged in the state agreement). The wait must end
and the side connection stay open: the server sees no EOF from rank 0."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

WORKER = textwrap.dedent("""
    import os, socket, sys, threading
    from types import SimpleNamespace
    import torch, torch.distributed as dist
    from agent.worker import groups
    from agent.worker.held import HeldState

    rank, server = int(sys.argv[1]), int(sys.argv[2])
    side = socket.create_connection(("127.0.0.1", server))
    side.sendall(b"rank%d" % rank)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3], rank=rank, world_size=2)
    model = torch.nn.Linear(2, 2)
    held = HeldState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    nothing_on_disk = SimpleNamespace(load=lambda default: (0, None), checkpoint_dir=None, round_number=None)
    held.agree(nothing_on_disk, None, 0, [local for local, _ in groups.tcp_endpoints().values()])  # as el.run's first entry
    mine = groups.group_sockets(groups.tcp_endpoints(), held.endpoints)
    if rank == 1:
        sys.stdin.read()  # frozen: never joins the next all-reduce
        os._exit(0)
    outcome = []
    def wait_on_peer():
        try:
            dist.all_reduce(torch.ones(1))
            outcome.append("completed")
        except Exception as exc:
            outcome.append("released")
    waiter = threading.Thread(target=wait_on_peer, daemon=True)
    waiter.start()
    waiter.join(1.0)
    groups.release(mine)
    waiter.join(60)
    print("wait:", outcome[0] if outcome else "still waiting", flush=True)
    sys.stdin.read()  # holds the side connection until the test is done
    os._exit(0)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_releasing_a_script_formed_group_leaves_the_ranks_other_connections_open(tmp_path: Path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(60)
    store = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    ranks = [subprocess.Popen([sys.executable, str(script), str(r), str(server.getsockname()[1]), str(store)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                              text=True) for r in (0, 1)]
    side: dict[str, socket.socket] = {}
    try:
        for _ in ranks:
            conn, _addr = server.accept()
            conn.settimeout(60)
            side[conn.recv(5).decode()] = conn
        line = ranks[0].stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == "wait: released", line
        side["rank0"].setblocking(False)
        try:
            data = side["rank0"].recv(1)
        except BlockingIOError:
            data = None  # open, nothing sent: what we want
        assert data is None, "rank 0 cut its connection to a server that is not a member of the group"
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait(30)
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
        for conn in side.values():
            conn.close()
        server.close()
