"""A worker that fails at once, every time: for restart-budget tests."""
import sys

print("always_fail: giving up", file=sys.stderr, flush=True)
raise SystemExit(1)
