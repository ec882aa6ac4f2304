"""Why a round was opened, or a worker group restarted: one named set, used everywhere.

A round's reason travels in etcd as ``"<kind>: <detail>"`` (``"node_lost: node-2"``); the
kind is a :class:`Reason`. Only failures of the job's own workers consume the restart
budget; membership changes never do.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    START = "start"  # the job's first round
    WORKER_FAILURE = "worker_failure"  # a local worker exited with an error
    HANG = "hang"  # a worker reported no step for --hang-timeout
    NODE_LOST = "node_lost"  # a member's lease expired (or it lost its lease and rejoined)
    NODE_LEFT = "node_left"  # a member left on purpose (SIGTERM, preemption notice)
    SCALE_UP = "scale_up"  # a waiting node can raise the world size
    LEASE_LOST = "lease_lost"  # this node was cut off from etcd and fenced its workers
    PREEMPTION = "preemption"  # this node leaves on a preemption notice
    UNREACHABLE = "unreachable"  # a member its ring neighbours cannot reach over the data network


# Reasons the job's own workers caused: these, and only these, spend --max-restarts.
FAILURES = frozenset({Reason.WORKER_FAILURE, Reason.HANG})

# Rounds opened for a planned change, after a step every rank could reach was announced (a
# node leaving, a standby joining). Any other round means a member broke the group: a stop
# step announced before it can no longer be reached.
PLANNED = frozenset({Reason.NODE_LEFT, Reason.SCALE_UP})


def reason_text(kind: Reason, detail: str = "") -> str:
    """The wire form of a round's reason."""
    return f"{kind.value}: {detail}" if detail else kind.value


def reason_kind(text: str) -> str:
    """The kind of a round's reason text (a :class:`Reason` value, or whatever an unknown
    writer put there, so a newer agent's reason never breaks an older one)."""
    kind = text.split(":", 1)[0].strip()
    try:
        return Reason(kind)
    except ValueError:
        return kind
