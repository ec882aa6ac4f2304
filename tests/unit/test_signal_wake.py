"""A worker's SIGUSR1 wakes the agent's loop whatever the loop is doing: the handler's wake must
never wait on a lock the interrupted loop holds (a hang there is for good, while the lease
threads keep the node "alive")."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Run in a child process: with a non-reentrant wake the child hangs, and only a process can be
# stopped from outside when it does.
_CHILD = textwrap.dedent("""
    import os, signal, threading
    from agent.daemon.signals import Signals
    from rendezvous.protocol.inbox import Inbox, ItemKind
    from rendezvous.memory_store import MemoryStore

    inbox = Inbox(MemoryStore())
    signals = Signals()
    signals.on_wake = inbox.wake
    signals.install()

    # 1. The signal lands while the loop holds the queue's lock (inside get()).
    lock = getattr(inbox._queue, "mutex", None)
    if lock is not None:
        with lock:
            signal.raise_signal(signal.SIGUSR1)
    else:
        signal.raise_signal(signal.SIGUSR1)
    item = inbox.get(5.0)
    assert item is not None and item.kind is ItemKind.WAKE, item
    print("woken", flush=True)

    # 2. Signals from another thread while the loop spins in get(), as workers send them.
    stop = threading.Event()
    def fire():
        while not stop.is_set():
            os.kill(os.getpid(), signal.SIGUSR1)
    sender = threading.Thread(target=fire, daemon=True)
    sender.start()
    for _ in range(20000):
        inbox.get(0.0)
    stop.set()
    sender.join()
    print("loop survived", flush=True)
""")


def test_sigusr1_while_the_loop_holds_the_queue_lock_still_wakes_it() -> None:
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the loop hung on a SIGUSR1 (output: {exc.stdout!r})") from None
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["woken", "loop survived"]
