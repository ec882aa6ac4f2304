"""Worker: start a child that ignores SIGTERM, print 'child <pid>', then idle (exits on SIGTERM).

With --exit, exit at once instead, leaving the child behind in the process group."""

import subprocess
import sys
import time

CHILD = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('child-ready', flush=True)\n"
    "deadline = time.monotonic() + 60\n"
    "while time.monotonic() < deadline: time.sleep(0.05)\n"
)
child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
assert child.stdout is not None
child.stdout.readline()  # wait until the child ignores SIGTERM
print(f"child {child.pid}", flush=True)
if "--exit" in sys.argv:
    sys.exit(0)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)
