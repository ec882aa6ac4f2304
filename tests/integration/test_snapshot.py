"""In-memory snapshots (agent.worker.snapshot) and the agreement that resumes from them when
every worker is new (agent.worker.held): real files, real sockets, real gloo processes."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from agent.worker import checkpoint as ckpt
from agent.worker.held import HeldState
from agent.worker.protocol import NODE_ID_ENV, SNAPSHOT_DIR_ENV
from agent.worker.snapshot import MAGIC, SnapshotDir, Snapshots
from agent.worker.snapshot_wire import write_key
from rendezvous.net import free_port
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
AGREE = ROOT / "tests" / "bin" / "snapshot_agree.py"
DEADLINE_S = 60.0
KEY = b"0123456789abcdef" * 4  # the job's snapshot key, as the agent hands it over


def state_with(weight: float, step: int) -> dict:
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, weight)
    held = HeldState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    held.completed = step
    return held.state_dict()


def payload_of(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def write_snapshot(directory: Path, name: str, *, weight: float, step: int, round_number: int, job: str = "j") -> Path:
    SnapshotDir(directory, job).write(name, {"step": step, "round": round_number}, payload_of(state_with(weight, step)))
    return directory / name


def test_the_newest_whole_snapshot_is_offered_and_a_torn_one_is_skipped_with_a_warning(tmp_path, caplog):
    write_snapshot(tmp_path, "own-0", weight=1.0, step=5, round_number=1)
    torn = write_snapshot(tmp_path, "peer-b-0", weight=2.0, step=9, round_number=1)
    torn.write_bytes(torn.read_bytes()[:-7])  # a write cut short
    snaps = Snapshots(SnapshotDir(tmp_path, "j"), 1, "a", 0)
    with caplog.at_level(logging.WARNING, logger="agent.worker.snapshot"):
        assert snaps.offer(max_round=1) == (1, 5)
    assert any(str(torn) in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert snaps.take()["model"]["weight"].item() == 1.0


def test_a_snapshot_of_this_round_or_later_or_of_another_job_is_never_offered(tmp_path):
    write_snapshot(tmp_path, "own-0", weight=1.0, step=50, round_number=3)
    write_snapshot(tmp_path, "peer-b-0", weight=2.0, step=60, round_number=1, job="other")
    write_snapshot(tmp_path, "peer-c-0", weight=3.0, step=4, round_number=2)
    snaps = Snapshots(SnapshotDir(tmp_path, "j"), 1, "a", 0)
    assert snaps.offer(max_round=2) == (2, 4)
    assert snaps.offer(max_round=1) is None


def test_a_later_round_wins_over_a_higher_step(tmp_path):
    write_snapshot(tmp_path, "peer-b-0", weight=2.0, step=90, round_number=1)  # a fenced node's late steps
    write_snapshot(tmp_path, "own-0", weight=1.0, step=40, round_number=2)
    assert Snapshots(SnapshotDir(tmp_path, "j"), 1, "a", 0).offer(max_round=5) == (2, 40)


def test_every_snapshot_lands_on_this_node_and_on_the_peer_node(tmp_path):
    here = Snapshots(SnapshotDir(tmp_path / "a", "j"), 2, "a", 0, key=KEY)
    there = Snapshots(SnapshotDir(tmp_path / "b", "j"), 2, "b", 0, key=KEY)
    addresses = [here.serve("127.0.0.1"), None, there.serve("127.0.0.1"), None]  # ranks 0 and 2 take them
    here.choose_peer(addresses, 0)
    there.choose_peer(addresses, 2)
    assert (here.peer, there.peer) == (addresses[2], addresses[0])
    assert not here.after_step(2, 1, state_with(7.0, 2))  # every 2 steps: after steps 1, 3, ...
    assert here.after_step(3, 1, state_with(7.0, 3))
    assert here.wait_idle(DEADLINE_S) and here.pushed == 3
    peer_copy = there.offer(max_round=1)
    assert peer_copy == (1, 3) and (tmp_path / "b" / "peer-a-0").is_file()
    assert there.take()["model"]["weight"].item() == 7.0
    assert here.offer(max_round=1) == (1, 3) and (tmp_path / "a" / "own-0").is_file()
    here.server.close()
    there.server.close()


def test_a_step_never_waits_for_a_snapshot_still_on_its_way(tmp_path):
    """A peer that accepts and never answers: the steps after go on and skip their snapshots."""
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True).start()
    snaps = Snapshots(SnapshotDir(tmp_path, "j"), 1, "a", 0, key=KEY)
    snaps.peer = f"127.0.0.1:{silent.getsockname()[1]}"
    state = state_with(1.0, 0)
    assert snaps.after_step(0, 1, state)
    began = time.monotonic()
    started = [snaps.after_step(step, 1, state) for step in range(1, 50)]
    assert time.monotonic() - began < 1.0 and not any(started)
    assert snaps.taken == 0
    wait_until(lambda: held, DEADLINE_S, "the silent peer to take the connection")
    silent.close()
    for conn in held:
        conn.close()  # the push fails now; the writer lets go
    assert snaps.wait_idle(DEADLINE_S) and snaps.written == 0


def agree(tmp_path: Path, node_dirs: list[Path | None], checkpoint_dir: Path, round_number: int,
          held: list[str] | None = None) -> list[dict]:
    """One rank per node, each new unless ``held`` gives it "round,step,weight" in memory: what
    each resumes from, as tests/bin/snapshot_agree.py prints."""
    port = free_port()
    procs = []
    for rank, node_dir in enumerate(node_dirs):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_AGENT_")}
        env.update({"RANK": str(rank), "WORLD_SIZE": str(len(node_dirs)), "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "j", NODE_ID_ENV: f"n{rank}",
                    "ELASTIC_AGENT_ROUND": str(round_number)})
        if node_dir is not None:
            env[SNAPSHOT_DIR_ENV] = str(node_dir)
            write_key(node_dir, KEY)
        if held is not None and held[rank]:
            env["TEST_HELD"] = held[rank]
        procs.append(subprocess.Popen([sys.executable, str(AGREE), str(checkpoint_dir)], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=DEADLINE_S)
            assert proc.returncode == 0, stderr
            out.append({**json.loads(stdout.strip().splitlines()[-1]), "log": stderr})
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


def test_every_worker_new_resumes_from_a_peers_copy_newer_than_the_disk_checkpoint(tmp_path):
    """Node 0 lost with its memory (its directory empty), node 1 holds node 0's copy of step 7;
    the disk checkpoint is of step 4. Both ranks take the copy: nothing is re-trained from 4."""
    checkpoints = tmp_path / "ckpt"
    ckpt.save(checkpoints, 4, {"state.pt": payload_of(state_with(4.0, 4))}, round_number=1)
    node0, node1 = tmp_path / "n0", tmp_path / "n1"
    write_snapshot(node1, "peer-n0-0", weight=7.0, step=7, round_number=1)
    ranks = agree(tmp_path, [node0, node1], checkpoints, round_number=2)
    assert [(r["after"], r["weight"]) for r in ranks] == [(7, 7.0), (7, 7.0)]
    assert "resumed from the in-memory snapshot of step 7" in ranks[0]["log"]
    assert ranks[0]["peer"] is not None and ranks[1]["peer"] is not None  # each now sends to the other


def test_a_disk_checkpoint_as_new_as_every_snapshot_is_read_from_disk(tmp_path):
    checkpoints = tmp_path / "ckpt"
    ckpt.save(checkpoints, 9, {"state.pt": payload_of(state_with(9.0, 9))}, round_number=1)
    node0, node1 = tmp_path / "n0", tmp_path / "n1"
    write_snapshot(node0, "own-0", weight=7.0, step=7, round_number=1)
    ranks = agree(tmp_path, [node0, node1], checkpoints, round_number=2)
    assert [(r["after"], r["weight"]) for r in ranks] == [(9, 9.0), (9, 9.0)]


def test_a_snapshot_of_the_current_round_is_not_this_jobs_and_is_never_used(tmp_path):
    """Left by an earlier job of the same id, reaching a round the new job is only now in."""
    node0 = tmp_path / "n0"
    write_snapshot(node0, "own-0", weight=7.0, step=70, round_number=1)
    ranks = agree(tmp_path, [node0, None], tmp_path / "ckpt", round_number=1)
    assert [(r["after"], r["weight"]) for r in ranks] == [(-1, 0.0), (-1, 0.0)]


@pytest.mark.parametrize("header", [b"[]", b"[" * 100_000 + b"]" * 100_000, b'{"job": "j", "size": 1e400}', b"\xff\xfe"])
def test_a_snapshot_with_a_garbled_header_is_skipped_with_a_warning(tmp_path, caplog, header):
    (tmp_path / "peer-x-0").write_bytes(MAGIC + header + b"\npayload")
    with caplog.at_level(logging.WARNING, logger="agent.worker.snapshot"):
        assert Snapshots(SnapshotDir(tmp_path, "j"), 1, "a", 0).offer(max_round=9) is None
    assert any("peer-x-0" in r.getMessage() for r in caplog.records)


def test_a_stray_sender_is_ignored_quietly_and_the_peer_still_gets_through(tmp_path, monkeypatch):
    crashed: list[object] = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    here = Snapshots(SnapshotDir(tmp_path / "a", "j"), 1, "a", 0, key=KEY)
    there = Snapshots(SnapshotDir(tmp_path / "b", "j"), 1, "b", 0, key=KEY)
    host, _, port = there.serve("127.0.0.1").rpartition(":")
    for junk in (b"[]\n", b"{\"size\": 1e400}\n", b"[" * 50_000 + b"\n"):
        with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as conn:
            conn.sendall(junk)
    # The junk is still being turned away on a loaded host (some of it may not even be accepted
    # yet); a push meanwhile may find both of the server's slots taken and be refused (by design:
    # a flood costs nothing): wait until all three connections are over.
    wait_until(lambda: there.server.ended >= 3, timeout=DEADLINE_S, what="the stray connections turned away")
    here.peer = there.address
    assert here.after_step(0, 1, state_with(3.0, 0)) and here.wait_idle(DEADLINE_S)
    assert here.pushed == 0 and there.offer(max_round=1) == (1, 0)
    assert crashed == []  # no receiving thread died with a traceback
    there.server.close()


def test_a_rank_idle_in_an_old_round_does_not_roll_the_job_back_past_a_newer_checkpoint(tmp_path):
    """Rank 1 holds step 90 of round 1 in memory (a standby idle for hours), rank 0 is new; the
    checkpoint on disk is step 20 of round 3. Both resume from the checkpoint."""
    checkpoints = tmp_path / "ckpt"
    ckpt.save(checkpoints, 20, {"state.pt": payload_of(state_with(20.0, 20))}, round_number=3)
    ranks = agree(tmp_path, [None, None], checkpoints, round_number=4, held=["", "1,90,90.0"])
    assert [(r["after"], r["weight"]) for r in ranks] == [(20, 20.0), (20, 20.0)]


def test_a_rank_holding_the_newest_state_gives_it_to_a_new_rank(tmp_path):
    checkpoints = tmp_path / "ckpt"
    ckpt.save(checkpoints, 20, {"state.pt": payload_of(state_with(20.0, 20))}, round_number=3)
    ranks = agree(tmp_path, [None, None], checkpoints, round_number=4, held=["", "3,25,25.0"])
    assert [(r["after"], r["weight"]) for r in ranks] == [(25, 25.0), (25, 25.0)]
