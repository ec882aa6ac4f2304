"""Worker for uneven-stop tests: on the node named by FAIL_NODE, exit 1 after FAIL_AFTER
seconds (default 0.5), every time or, with FAIL_ONCE_MARKER, only while that file does not
exist yet (it is created); elsewhere run until SIGTERM, then take STOP_DELAY seconds to exit
(as GPU workers tearing down CUDA do). Prints 'running round N' once."""

import os
import signal
import sys
import time

delay = float(os.environ.get("STOP_DELAY", "0"))


def slow_exit(signum, frame):
    time.sleep(delay)
    os._exit(143)


signal.signal(signal.SIGTERM, slow_exit)
print(f"running round {os.environ.get('ELASTIC_AGENT_ROUND')}", flush=True)

def should_fail() -> bool:
    if os.environ.get("ELASTIC_AGENT_NODE_ID") != os.environ.get("FAIL_NODE"):
        return False
    marker = os.environ.get("FAIL_ONCE_MARKER")
    if not marker:
        return True
    try:
        open(marker, "x").close()
    except FileExistsError:
        return False
    return True


if should_fail():
    time.sleep(float(os.environ.get("FAIL_AFTER", "0.5")))
    print("fail_or_wait: failing", file=sys.stderr, flush=True)
    sys.exit(1)
deadline = time.monotonic() + 120  # a safety net: never outlive a broken test
while time.monotonic() < deadline:
    time.sleep(0.05)
