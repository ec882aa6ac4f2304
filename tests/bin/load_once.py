"""Worker: initialise gloo, ``Elastic.load``, report what was loaded, exit. For the checkpoint-choice tests.

Args: SYNC_DIR. Prints ``resumed START state STEP`` (STEP: the ``step`` saved in the state,
-1 for the default) and ``payload opens N`` (how often this process opened a file of a
checkpoint's payload directory), then exits 0; an error in ``load`` is printed and exits 1.

The race made deterministic: rank 1 wraps ``torch.distributed.broadcast_object_list`` so
that, once it has received rank 0's announcement, it writes ``SYNC_DIR/announced`` and waits
for ``SYNC_DIR/committed`` (the test commits a newer checkpoint in between) before going on
to load. A rank that picked the latest checkpoint itself would now pick the newer one.
"""

import builtins
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # for tests.waiting

import torch.distributed as dist  # noqa: E402

from agent.worker import Elastic  # noqa: E402
from agent.worker.protocol import CHECKPOINT_DIR_ENV  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

SYNC_DIR = Path(sys.argv[1])
WAIT_S = 30.0
rank = int(os.environ["RANK"])
checkpoint_dir = Path(os.environ[CHECKPOINT_DIR_ENV]).resolve()

payload_opens = 0
real_open = builtins.open


def counting_open(file, *args, **kwargs):
    global payload_opens
    if isinstance(file, (str, os.PathLike)) and Path(file).resolve().parent.parent == checkpoint_dir \
            and Path(file).resolve().parent.name.startswith("step_"):
        payload_opens += 1
    return real_open(file, *args, **kwargs)


builtins.open = counting_open

if rank == 1:
    real_broadcast = dist.broadcast_object_list

    def broadcast_then_wait(objects, *args, **kwargs):
        result = real_broadcast(objects, *args, **kwargs)
        dist.broadcast_object_list = real_broadcast  # only the first one: the announcement
        (SYNC_DIR / "announced").write_text(repr(objects[0]))
        wait_until(lambda: (SYNC_DIR / "committed").exists(), WAIT_S, "the test to commit a newer checkpoint")
        return result

    dist.broadcast_object_list = broadcast_then_wait

dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=30))
try:
    start, state = Elastic().load(default=lambda: {"step": -1})
except Exception:
    traceback.print_exc()
    sys.stdout.flush()
    os._exit(1)  # a clean teardown needs every rank; the others failed too
print(f"resumed {start} state {state['step']}", flush=True)
print(f"payload opens {payload_opens}", flush=True)
dist.barrier()
dist.destroy_process_group()
