"""The agent's states, named once (torch's ``WorkerState``, supervisor's ``states.py``).

    initializing -> rendezvous -> running -> (restarting -> rendezvous ...)
                 -> succeeded | failed | stopped        (stopping: leaving on request)
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    INITIALIZING = "initializing"
    RENDEZVOUS = "rendezvous"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"


FINAL = frozenset({State.SUCCEEDED, State.FAILED, State.STOPPED})
# The local workers may still be running (or draining) in these.
WITH_WORKERS = frozenset({State.RUNNING, State.RESTARTING, State.STOPPING})
