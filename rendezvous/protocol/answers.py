"""Waiting for every member's answer to a planned stop: one read and a watch on ``cleared/``.

The initiator of a planned stop used to read ``rounds/<n>/cleared/`` every 10 ms for up to
3 s: up to 300 prefix reads per stop, each returning every answer so far (O(N) bytes at N
members). Now it reads once and watches the prefix from that revision: one event per answer,
however long it waits (issue 25).
"""

from __future__ import annotations

import logging
import threading
import time

from rendezvous.errors import RendezvousError
from rendezvous.settings import Settings
from rendezvous.store import KV, PUT, Event, Store

log = logging.getLogger(__name__)


def _parse(prefix: str, items: list[KV] | list[Event], into: dict[str, int]) -> None:
    for kv in items:
        if isinstance(kv, Event) and kv.kind != PUT:
            continue
        try:  # a value from etcd: an answer we cannot read counts as none
            into[kv.key[len(prefix):]] = int(kv.value)
        except ValueError:
            log.warning("ignoring %s: %r is not a step", kv.key, kv.value[:40])


def await_answers(store: Store, settings: Settings, number: int, members: set[str],
                  timeout: float) -> tuple[dict[str, int], bool]:
    """Every member's answer in round ``number``, waiting up to ``timeout`` seconds for the
    missing ones. Returns (node id -> answer, whether every member in ``members`` answered).
    Raises RendezvousError when the first read fails; a watch that fails ends the wait early."""
    prefix = settings.cleared_prefix(number)
    kvs, revision = store.get_prefix(prefix)
    answers: dict[str, int] = {}
    _parse(prefix, kvs, answers)
    if members <= answers.keys():
        return answers, True
    lock, woke = threading.Lock(), threading.Event()
    arrived: list[Event] = []
    failed: list[BaseException] = []

    def on_events(events: list[Event]) -> None:
        with lock:
            arrived.extend(events)
        woke.set()

    def on_error(exc: BaseException) -> None:
        failed.append(exc)
        woke.set()

    watch = store.watch(prefix, on_events, on_error, revision + 1, prefix=True)
    try:
        deadline = time.monotonic() + timeout
        while not members <= answers.keys() and not failed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            woke.wait(left)
            woke.clear()
            with lock:
                taken, arrived[:] = list(arrived), []
            _parse(prefix, taken, answers)
    finally:
        try:
            watch.cancel()
        except RendezvousError:
            pass
    if failed:
        log.warning("the watch on %s failed (%s); choosing with the answers so far", prefix, failed[0])
    return answers, members <= answers.keys()
