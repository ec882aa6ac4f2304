"""``python -m tests.bench.rdzv_sim`` as a user runs it, small: every scenario forms, no lease
expires, and the keep-alives the simulator says it sent are the ones etcd says it received
(its refreshes are driven by one timer per process, not a thread per lease: etcd must not
see the difference)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_small_run_forms_every_scenario_and_etcd_gets_every_keepalive() -> None:
    out = subprocess.run([sys.executable, "-m", "tests.bench.rdzv_sim", "--nodes", "24", "--procs", "2",
                          "--ramp", "0.5", "--timeout", "60"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert [r["scenario"] for r in rows] == ["first", "lost", "join", "leave"]
    assert [line.split("|")[2].strip() for line in out.stdout.splitlines() if line.startswith("| 24 ")] == \
        ["first", "lost", "join", "leave"]
    for row in rows:
        assert row["round"] > 0 and row["expired"] == 0 and row["grants"] == row["registrations"], row
        assert row["refresh_errors"] == 0, row
    # Over the whole run (the scrape and the processes' counts are taken a moment apart, so
    # per scenario they differ by a refresh or two).
    sent = sum(r["keepalives"] for r in rows)
    got = sum(r["etcd_keepalives"] for r in rows)
    assert sent > 0 and abs(sent - got) <= max(10, 0.1 * sent), (sent, got)
