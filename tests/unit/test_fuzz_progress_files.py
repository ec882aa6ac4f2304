"""Fuzzed progress files (DESIGN.md invariant 5): the agent reads each worker's progress file
(written by the helper, agent.worker.helper) at every look at its workers, so whatever a worker
or a stray process leaves there (garbage, JSON nested past any stack, a list, a step no
integer holds) reads as "nothing valid reported" (None), never as an exception in the loop.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.daemon.policy import Progress, read_progress

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
REAL = {"step": 120, "time": 1700000000.5, "mono": 1234.5, "phase": "train", "mode": "", "round": 3}
EDGES = [None, True, 0, -1, 10**400, 1.5, float("nan"), float("inf"), "", "7", [], {}, [[[[]]]]]

documents = st.one_of(
    st.fixed_dictionaries({}, optional={k: st.sampled_from(EDGES + [v]) for k, v in REAL.items()}).map(
        lambda d: json.dumps(d).encode()),
    st.sampled_from([b"[" * 100_000, b"[]", b"1", b'"x"', b"", json.dumps(REAL).encode()[:20]]),
    st.binary(max_size=60),
)


@FUZZ
@given(documents)
@example(b"[]")
@example(b'{"step": 1e400, "time": 1}')
@example(b"[" * 100_000)
def test_a_progress_file_reads_as_progress_or_none(raw) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "progress.json"
        path.write_bytes(raw)
        (found,) = read_progress([path])
    assert found is None or isinstance(found, Progress)
    if found is not None:
        assert isinstance(found.step, int) and math.isfinite(found.time)


def test_the_real_document_reads() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "progress.json"
        path.write_text(json.dumps(REAL))
        assert read_progress([path]) == [Progress(120, 1700000000.5, 1234.5, "train", "", 3)]
