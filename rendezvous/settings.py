"""Rendezvous settings, validated once."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Job and node ids: they become etcd key segments and directory names.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
ID_FORM = "must be 1-128 characters of letters, digits, '_', '.', '-', starting with a letter or digit"


def valid_id(text: str) -> bool:
    return bool(_ID.fullmatch(text))  # not match: "$" would let a trailing newline through


@dataclass(frozen=True)
class Settings:
    job_id: str
    min_nodes: int
    max_nodes: int
    # A node's lease: its membership keys vanish this long after it stops refreshing, and it
    # fences its own workers before (the bound of invariant 2).
    lease_ttl: float = 10.0
    # A node's presence: a second, short lease whose key its peers watch. A node silent this
    # long (frozen, cut off, reclaimed) is replaced; it is not fenced until lease_ttl.
    presence_ttl: float = 2.0
    # After min nodes joined, close once no new node joined for this long.
    last_call: float = 0.5
    # The same for every round after the first: the live members of the last round rejoin
    # within milliseconds of seeing it end, so only a member that is gone is waited for.
    rejoin_call: float = 0.25
    # A standby waits this long (steadily alive) before it opens a round to raise the world size.
    scale_up_cooldown: float = 1.0
    # Job-wide budget of restarts caused by worker failures (None: unlimited). Membership
    # changes (a node lost, left or added) never consume it.
    max_restarts: int | None = None
    prefix: str = "/elastic-agent"

    def __post_init__(self) -> None:
        if not valid_id(self.job_id):
            raise ValueError(f"job id ({self.job_id!r}) {ID_FORM}")
        if self.min_nodes < 1:
            raise ValueError(f"min nodes ({self.min_nodes}) must be >= 1")
        if self.max_nodes < self.min_nodes:
            raise ValueError(f"min nodes ({self.min_nodes}) must be <= max nodes ({self.max_nodes})")
        if self.lease_ttl < 2:
            raise ValueError(f"lease ttl ({self.lease_ttl}) must be >= 2 seconds")
        if not 2 <= self.presence_ttl <= self.lease_ttl:
            raise ValueError(f"presence ttl ({self.presence_ttl}) must be >= 2 seconds and <= the lease ttl "
                             f"({self.lease_ttl})")
        if self.last_call < 0:
            raise ValueError(f"last call ({self.last_call}) must be >= 0 seconds")
        if self.rejoin_call < 0:
            raise ValueError(f"rejoin call ({self.rejoin_call}) must be >= 0 seconds")
        if self.max_restarts is not None and self.max_restarts < 0:
            raise ValueError(f"max restarts ({self.max_restarts}) must be >= 0")
        if self.scale_up_cooldown < 0:
            raise ValueError(f"scale-up cooldown ({self.scale_up_cooldown}) must be >= 0 seconds")

    # Key layout (DESIGN.md section 3), in one place.
    @property
    def root(self) -> str:
        return f"{self.prefix}/{self.job_id}/"

    def node_key(self, node_id: str) -> str:
        return f"{self.root}nodes/{node_id}"

    @property
    def nodes_prefix(self) -> str:
        return f"{self.root}nodes/"

    def presence_key(self, node_id: str) -> str:
        return f"{self.root}presence/{node_id}"

    @property
    def presence_prefix(self) -> str:
        return f"{self.root}presence/"

    @property
    def round_key(self) -> str:
        return f"{self.root}round"

    def joined_prefix(self, number: int) -> str:
        return f"{self.root}rounds/{number}/joined/"

    def joined_key(self, number: int, node_id: str) -> str:
        return f"{self.joined_prefix(number)}{node_id}"

    def done_prefix(self, number: int) -> str:
        return f"{self.root}rounds/{number}/done/"

    def cleared_prefix(self, number: int) -> str:
        """Each member's answer to a planned stop: the last step its workers may start."""
        return f"{self.root}rounds/{number}/cleared/"

    def members_key(self, number: int) -> str:
        """A closed round's assignment, apart from ``round`` so that changing that costs O(1)."""
        return f"{self.root}rounds/{number}/members"

    def round_prefix(self, number: int) -> str:
        return f"{self.root}rounds/{number}/"

    @property
    def snapshot_key_key(self) -> str:
        """The job's secret for the workers' snapshot transport (agent.worker.snapshot_wire)."""
        return f"{self.root}snapshot-key"

    @property
    def status_key(self) -> str:
        return f"{self.root}status"

    @property
    def restarts_key(self) -> str:
        return f"{self.root}restarts"

    @property
    def reach_prefix(self) -> str:
        """``reach/<node-id>``: the peers a node cannot reach (rendezvous.protocol.reachability.Report)."""
        return f"{self.root}reach/"
