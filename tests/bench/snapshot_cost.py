"""What one rank's in-memory snapshot of sharded state costs in CPU, piece by piece.

    python -m tests.bench.snapshot_cost [--mib 150] [--repeat 5]

One process, one thread for the training side, the receiving port in a thread of the same
process (so "push" counts both ends: the sender's HMAC and socket copy, the receiver's copy,
HMAC and write). The pieces, as agent.worker.sharded_memory takes them: the copy of the
shards to host memory (the step's stall), the rank file's index and crc32 per MiB, the push
to the peer's port, the write into /dev/shm. CPU seconds (time.process_time), medians; once
with the buffers kept between snapshots (what el.run does), once with fresh ones each time
(what it did before).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from agent.worker import shard_store as store
from agent.worker import snapshot_wire as wire
from agent.worker.shard_store import host_copy

PARTS = ("copy to host", "index + crc32", "push (both ends)", "write to /dev/shm")


def measure(mib: int, repeat: int, keep_buffers: bool) -> dict[str, list[float]]:
    key = os.urandom(32)
    root = Path(tempfile.mkdtemp(prefix="snapshot-cost-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    try:
        mine, theirs = store.ShardDir(root / "a", "j"), store.ShardDir(root / "b", "j")
        server = wire.PeerServer(lambda head, payload: theirs.write((head["round"], head["step"], head["rank"],
                                                                     head["world"]), payload),
                                 "127.0.0.1", job="j", key=key, max_bytes=lambda: 1 << 40)
        numel = mib * 2**20 // 4 // 12
        shards = {f"layer{i}": torch.randn(numel) for i in range(12)}
        buffers: dict[str, torch.Tensor] = {}
        taken: dict[str, list[float]] = {p: [] for p in PARTS}
        for step in range(repeat + 1):  # the first one warms up
            if not keep_buffers:
                buffers, server._spare = {}, None
            marks = [time.process_time()]
            pieces = {n: (host_copy(n, t, buffers), tuple(t.shape), (0,)) for n, t in shards.items()}
            marks.append(time.process_time())
            file_key = (1, step, 0, 1)
            head, parts = store.pack("j", file_key, pieces)
            marks.append(time.process_time())
            wire.push(server.address, {"node": "a", "local_rank": 0, "round": 1, "step": step, "kind": "shard",
                                       "rank": 0, "world": 1}, [memoryview(head), *parts], job="j", key=key)
            marks.append(time.process_time())
            mine.write(file_key, head, *parts)
            marks.append(time.process_time())
            if step:
                for part, a, b in zip(PARTS, marks, marks[1:]):
                    taken[part].append(b - a)
        server.close()
        return taken
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=150, help="the rank's shards (default 150: 50M params + Adam / 4)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    kept, fresh = measure(args.mib, args.repeat, True), measure(args.mib, args.repeat, False)
    print(f"\none rank's snapshot of {args.mib} MiB, CPU seconds, medians of {args.repeat}")
    print(f"{'':20s} {'buffers kept':>13s} {'fresh buffers':>14s}")
    for part in PARTS:
        print(f"{part:20s} {statistics.median(kept[part]):13.3f} {statistics.median(fresh[part]):14.3f}")
    total = [sum(statistics.median(t[p]) for p in PARTS) for t in (kept, fresh)]
    print(f"{'total':20s} {total[0]:13.3f} {total[1]:14.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
