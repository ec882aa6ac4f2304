"""One rule for where a new process group resumes from (agent.worker.choice.newest_source)."""

from __future__ import annotations

import pytest

from agent.worker.choice import Source, newest_source


@pytest.mark.parametrize(("memory", "snapshots", "disk", "expected"), [
    # A standby's worker idle since round 2 never wins over round 4's checkpoint...
    ([(2, 900), None], [None, None], (4, 300), Source("disk")),
    # ...nor over a snapshot of a later round.
    ([(2, 900), None], [None, (3, 10)], None, Source("snapshot", 1)),
    # The most advanced rank of the newest round wins.
    ([(4, 310), (4, 300), (2, 900)], [None, None, None], (4, 305), Source("memory", 0)),
    ([(4, 300), (5, 1)], [None, None], None, Source("memory", 1)),
    # Ties: memory (nothing to read), then disk (verified), then a snapshot.
    ([(3, 7), None], [None, (3, 7)], (3, 7), Source("memory", 0)),
    ([None, None], [(3, 7), None], (3, 7), Source("disk")),
    ([None, None], [(3, 8), (3, 9)], (3, 7), Source("snapshot", 1)),
    ([None, None], [(3, 9), (3, 9)], None, Source("snapshot", 0)),
    # Nothing anywhere: the beginning (disk with no checkpoint).
    ([None], [None], None, Source("disk")),
    # A checkpoint without a round (-1) sorts below every round.
    ([(0, 1)], [None], (-1, 500), Source("memory", 0)),
])
def test_the_newest_round_then_step_wins_across_memory_snapshots_and_disk(memory, snapshots, disk, expected):
    assert newest_source(memory, snapshots, disk) == expected
