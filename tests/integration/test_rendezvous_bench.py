"""``python -m tests.bench.rdzv_scale`` as a user runs it: bad flags exit 2 in one line; a small run
prints one JSON line with the documented fields."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tests.bench.rdzv_scale", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("value,shown", [("0", "(0)"), ("x", "('x')"), ("-3", "(-3)")])
def test_bad_node_count_is_a_one_line_usage_error(value: str, shown: str) -> None:
    out = bench("--nodes", value, timeout=30)
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("tests.bench.rdzv_scale: ")
    assert f"--nodes {shown} must be a positive integer" in lines[0]


def test_missing_node_count_is_a_usage_error() -> None:
    out = bench(timeout=30)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "--nodes" in out.stderr


def test_eight_nodes_report_one_json_line() -> None:
    out = bench("--nodes", "8", "--last-call", "0.3", "--lease-ttl", "5")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    result = json.loads(lines[0])
    assert result["nodes"] == 8
    assert result["assignment_ok"] is True
    assert "errors" not in result
    assert isinstance(result["round_seconds"], float) and 0 < result["round_seconds"] < 60
    counts = result["requests_by_type"]
    assert isinstance(counts, dict) and all(isinstance(v, int) and v > 0 for v in counts.values())
    assert result["etcd_requests_per_node"] == pytest.approx(sum(counts.values()) / 8, abs=0.01)
    # O(1) per node: a handful of requests each, not a listing per node per change
    assert result["etcd_requests_per_node"] < 40
    assert list(result)[:5] == ["nodes", "round_seconds", "etcd_requests_per_node", "requests_by_type",
                                "assignment_ok"]
