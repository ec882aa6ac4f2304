"""Worker: ignore SIGTERM, say 'ready', then idle until killed (or 60 s pass, as a safety net)."""

import signal
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)
