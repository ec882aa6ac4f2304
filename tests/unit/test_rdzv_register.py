"""Registration when etcd applied our transaction but its reply was lost: the retry finds our
own key on our own lease and goes on; a key on another live lease is still refused."""

from __future__ import annotations

import pytest

from rendezvous.errors import RendezvousError
from rendezvous.memory_store import MemoryStore
from rendezvous.participant import Participant
from rendezvous.settings import Settings
from rendezvous.state import NodeRecord

SETTINGS = Settings(job_id="job", min_nodes=1, max_nodes=2, lease_ttl=5, presence_ttl=5)


class LostReply(MemoryStore):
    """The first registration is applied, then answered as its own retry would be: with the
    compare failed, because the key now exists (what etcd answers a retried transaction)."""

    def __init__(self) -> None:
        super().__init__(reap_interval=None)
        self.replayed = False

    def commit(self, compares, puts, lease=0, reads=()):
        result = super().commit(compares, puts, lease=lease, reads=reads)
        if puts and not self.replayed and result.succeeded:
            self.replayed = True
            return super().commit(compares, puts, lease=lease, reads=reads)
        return result


def test_a_lost_registration_reply_is_recognised_as_our_own_success() -> None:
    store = LostReply()
    p = Participant(store, SETTINGS, NodeRecord("a", "127.0.0.1", 1))
    try:
        p.start(timeout=1.0)
        assert store.replayed
        kv, _ = store.get(SETTINGS.node_key("a"))
        assert kv is not None and p.session is not None and kv.lease == p.session.lease
    finally:
        p.close()
        store.close()


def test_a_live_agent_of_the_same_id_is_still_refused() -> None:
    store = MemoryStore(reap_interval=None)
    first = Participant(store, SETTINGS, NodeRecord("a", "127.0.0.1", 1))
    second = Participant(store, SETTINGS, NodeRecord("a", "127.0.0.2", 1))
    try:
        first.start()
        with pytest.raises(RendezvousError, match="already registered .* by a live agent"):
            second.start(timeout=0.3)
    finally:
        first.close()
        second.close()
        store.close()
