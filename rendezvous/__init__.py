"""etcd v3 rendezvous for elastic training jobs, usable without the agent.

Public surface: :class:`Participant` (join, wait for an assignment, watch for the next
round, leave), the :class:`~rendezvous.settings.Settings` it runs under, the state records
in :mod:`rendezvous.state` (with their named values :class:`RoundPhase` and :class:`Outcome`),
why rounds open (:class:`~rendezvous.reasons.Reason`), and the stores in :mod:`rendezvous.store`.
"""

from rendezvous.errors import (
    CorruptStateError,
    JobFinishedError,
    LeaseLostError,
    RendezvousError,
    RendezvousTimeoutError,
    StoreUnavailableError,
)
from rendezvous.reasons import Reason
from rendezvous.settings import Settings
from rendezvous.state import Assignment, JoinRecord, Member, NodeRecord, Outcome, RoundPhase, RoundState

__all__ = [
    "Assignment",
    "CorruptStateError",
    "JobFinishedError",
    "JoinRecord",
    "LeaseLostError",
    "Member",
    "NodeRecord",
    "Outcome",
    "Reason",
    "RendezvousError",
    "RendezvousTimeoutError",
    "RoundPhase",
    "RoundState",
    "Settings",
    "StoreUnavailableError",
]
