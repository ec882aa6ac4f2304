"""Typed errors of the rendezvous. Client-library errors never leak past the store adapter."""


class RendezvousError(Exception):
    """Base class of every error this package raises on purpose."""


class StoreUnavailableError(RendezvousError):
    """The store (etcd) could not be reached, or did not answer in time."""


class StoreFullError(StoreUnavailableError):
    """etcd is out of space (its NOSPACE alarm is raised): it refuses writes until an operator
    compacts, defragments and disarms it. Handled as an outage (what needed the write is tried
    again), but named as what it is in every log line and in its own metric."""


class LeaseLostError(RendezvousError):
    """Our lease expired or was revoked: our keys are gone and others may have moved on."""


class RendezvousTimeoutError(RendezvousError):
    """A bounded wait ran out."""


class JobFinishedError(RendezvousError):
    """The job already has an outcome; there is nothing left to join."""

    def __init__(self, outcome: str, reason: str) -> None:
        super().__init__(f"job already {outcome}: {reason}")
        self.outcome = outcome
        self.reason = reason


class CorruptStateError(RendezvousError):
    """A key holds something we cannot read. The message names the key and what was expected."""

    def __init__(self, key: str, expected: str, found: str) -> None:
        super().__init__(f"etcd key {key!r}: expected {expected}, found {found}")
        self.key = key
        self.expected = expected
        self.found = found


class StoreConfigError(RendezvousError):
    """etcd refused how we connect or who we are (TLS certificates, user, password, permission
    on the job's keys). Retrying cannot help: the message names what to fix."""
