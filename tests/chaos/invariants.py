"""The invariants of DESIGN.md section 7, checked after every scenario from what it left:
etcd's history, the agents' own words, the checkpoint directory. Each check returns the
violations it found, one line each, naming the invariant.

1. One assignment per round (tests/chaos/history.py), and every group rank an agent ran as is
   the one etcd's assignment gave it, to no other node.
2. Fencing is checked by the scenarios that cut a node off (they know when they did).
3. Bounded recovery: each scenario's waits have deadlines and report a violation on timeout.
4. Every checkpoint on disk is complete and loadable; no resume loaded a checkpoint that a
   round wrote after a newer round had started training.
5. No agent printed a traceback of its own.
"""

from __future__ import annotations

from pathlib import Path

from tests.chaos.evidence import CheckpointWatcher, Timeline, tracebacks
from tests.chaos.history import RoundHistory
from tests.e2e.harness import AgentProc

STATE_FILE = "state.pt"  # what agent.worker's helper writes (agent.worker.helper.STATE_FILE, which imports torch)


def ranks_as_assigned(tl: Timeline, hist: RoundHistory) -> list[str]:
    """Invariant 1 from the agents' side: what each agent said it ran is etcd's assignment."""
    out = []
    holders: dict[tuple[int, int], set[str]] = {}
    for c in tl.claims:
        assigned = hist.assignments.get(c.round)
        holders.setdefault((c.round, c.group_rank), set()).add(c.node)
        if assigned is None:
            out.append(f"inv 1: {c.node} ran round {c.round}, which etcd never closed")
        elif c.group_rank >= len(assigned) or assigned[c.group_rank][0] != c.node:
            out.append(f"inv 1: {c.node} ran round {c.round} as group rank {c.group_rank}; etcd assigned "
                       f"{[node for node, _ in assigned]}")
    for (number, rank), nodes in sorted(holders.items()):
        if len(nodes) > 1:
            out.append(f"inv 1: group rank {rank} of round {number} was given to {sorted(nodes)}")
    return out


def checkpoints_complete(directory: Path) -> tuple[list[str], str]:
    """Invariant 4 on disk: every checkpoint with a manifest matches it (sizes, sha256) and its
    state loads with torch. Leftovers without a manifest are not checkpoints (every loader skips
    them); they are counted, not failed. Returns (violations, a one-line summary)."""
    import torch  # noqa: PLC0415 - the runner imports torch only here, once

    from agent.worker.manifest import CheckpointError, read_manifest, scan, verify  # noqa: PLC0415

    listing = scan(directory)
    out = []
    for step, path in sorted(listing.manifests.items()):
        try:
            checkpoint = read_manifest(directory, path, step)
            verify(checkpoint, check_hashes=True)
            torch.load(checkpoint.file(STATE_FILE), map_location="cpu")
        except CheckpointError as exc:
            out.append(f"inv 4: {exc}")
        except Exception as exc:  # noqa: BLE001 - whatever torch says, it is not loadable
            out.append(f"inv 4: checkpoint {path.name} does not load: {type(exc).__name__}: {exc}")
    leftovers = len(set(listing.step_dirs) - set(listing.manifests)) + len(listing.temps)
    summary = f"{len(listing.manifests)} checkpoints complete and loadable" if not out else \
        f"{len(out)} of {len(listing.manifests)} checkpoints bad"
    if leftovers:
        summary += f"; {leftovers} unfinished saves left (no manifest: never loaded)"
    return out, summary


def no_stale_loads(tl: Timeline, watcher: CheckpointWatcher) -> list[str]:
    """Invariant 4 across rounds: a checkpoint written by round r after a newer round had started
    training (a zombie's late save) is never what a resume loaded."""
    started = tl.round_started()
    out = []
    for r in tl.resumes:
        if r.step == 0:
            continue
        loaded = watcher.version_at(r.step - 1, r.t)
        if loaded is None:
            out.append(f"inv 4: {r.node} resumed from step {r.step} in round {r.round}, but no checkpoint of "
                       f"step {r.step - 1} was on disk")
            continue
        newer = [n for n, t in started.items() if loaded.round is not None and n > loaded.round and t < loaded.written]
        if newer:
            out.append(f"inv 4: {r.node} (round {r.round}) loaded step {loaded.step} of round {loaded.round}, written "
                       f"after round {min(newer)} had started training")
        if loaded.round is not None and loaded.round > r.round > 0:
            out.append(f"inv 4: {r.node} (round {r.round}) loaded a checkpoint of the newer round {loaded.round}")
    return out


def no_tracebacks(agents: list[AgentProc]) -> list[str]:
    return [f"inv 5: traceback in {found}" for agent in agents for found in tracebacks(agent)]
