"""etcd v3 rendezvous for elastic training jobs, usable without the agent.

Public surface: :class:`Participant` (join, wait for an assignment, watch for the next
round, leave), the :class:`~rendezvous.settings.Settings` it runs under, the state records
in :mod:`rendezvous.state`, and the stores in :mod:`rendezvous.store`.
"""

from rendezvous.errors import (
    CorruptStateError,
    JobFinishedError,
    LeaseLostError,
    RendezvousError,
    RendezvousTimeoutError,
    StoreUnavailableError,
)
from rendezvous.settings import Settings
from rendezvous.state import Assignment, JoinRecord, Member, NodeRecord, RoundState

__all__ = [
    "Assignment",
    "CorruptStateError",
    "JobFinishedError",
    "JoinRecord",
    "LeaseLostError",
    "Member",
    "NodeRecord",
    "RendezvousError",
    "RendezvousTimeoutError",
    "RoundState",
    "Settings",
    "StoreUnavailableError",
]
