"""The contract between the agent and the worker helper (``agent.worker.helper``), as data. No torch here.

Environment variables the agent sets for each worker (absent under plain torchrun):

- ``ELASTIC_AGENT_CHECKPOINT_DIR``: where checkpoints go (``agent.worker.checkpoint`` layout).
- ``ELASTIC_AGENT_ROUND``: the rendezvous round the worker belongs to; every checkpoint is
  stamped with it, "latest" means the newest round, then the highest step, global rank 0
  records it in the directory's fence file once it has chosen the checkpoint to resume from,
  and a save is refused when the fence or a complete checkpoint names a newer round (a
  zombie of an old round can never replace newer work).
- ``ELASTIC_AGENT_PROGRESS_FILE``: one per worker. After each step the helper replaces it
  (temp file + ``os.replace``) with ``{"v": 1, "step": N, "time": <unix time>, "mono": <the
  host's time.monotonic(), what hang detection compares>, "pid": P, "round": R,
  "mode": "plain" | "inprocess", "phase": "train" | "checkpointed" | "drained" | "finished" |
  "paused" | "broken"}``, and ``"busy": <seconds>`` where the worker passed one to ``el.step``
  (the step's own work, collectives' waits left out: what tells a straggler in a lockstep
  job); ``step`` is the last completed step. Readers must ignore keys they
  do not know.
- ``ELASTIC_AGENT_CONTROL_FILE``: one per node: what the agent asks of its workers
  (``agent.worker.control``): a step to stop after (every rank of the job is told the same
  one), an abort of a broken process group, and, for in-process workers, their place in the
  next round.
- ``ELASTIC_AGENT_SNAPSHOT_DIR``: one per node, in shared memory (``/dev/shm``) where there
  is one: the in-memory snapshots of in-process workers and their peers' copies
  (``agent.worker.snapshot``). The agent removes it when the job has finished. In it the
  agent leaves ``.key`` (mode 0600): the job's key for the snapshot transport
  (``agent.worker.snapshot_wire``); a worker that turned snapshots off (no room) leaves
  ``.off``: ``{"v": 1, "why": ...}``.
- ``ELASTIC_AGENT_PID``: the agent's pid (see below).

Exit code ``DRAINED_EXIT_CODE`` (75, ``EX_TEMPFAIL``): the worker stopped at a step boundary
because it was asked to, after a complete checkpoint of that step was written (when a
checkpoint directory is configured). It is not a failure.
"""

from __future__ import annotations

CHECKPOINT_DIR_ENV = "ELASTIC_AGENT_CHECKPOINT_DIR"
ROUND_ENV = "ELASTIC_AGENT_ROUND"
PROGRESS_FILE_ENV = "ELASTIC_AGENT_PROGRESS_FILE"
CONTROL_FILE_ENV = "ELASTIC_AGENT_CONTROL_FILE"
NODE_ID_ENV = "ELASTIC_AGENT_NODE_ID"
SNAPSHOT_DIR_ENV = "ELASTIC_AGENT_SNAPSHOT_DIR"
# The agent's pid: an in-process worker whose process group broke sends it SIGUSR1, so the
# agent reacts at once instead of at its next poll.
AGENT_PID_ENV = "ELASTIC_AGENT_PID"

DRAINED_EXIT_CODE = 75
PROGRESS_VERSION = 1
OFF_FILE = ".off"  # in a node's snapshot directory: why snapshots are off there (the agent exports it)
