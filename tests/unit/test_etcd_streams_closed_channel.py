"""A stream opened on a channel another thread just closed (an endpoint failover) is an etcd
outage the caller retries, not a crash: `make chaos` found the lease thread dead of
"ValueError: Cannot invoke RPC: Channel closed!", so nothing refreshed the node's lease."""

from __future__ import annotations

import pytest

from rendezvous.errors import StoreUnavailableError
from rendezvous.etcd.streams import KeepAliveStream, WatchStream
from rendezvous.store import RequestCounter


class ClosedChannelStub:
    def LeaseKeepAlive(self, requests):  # noqa: N802 - gRPC's name
        raise ValueError("Cannot invoke RPC: Channel closed!")

    def Watch(self, requests):  # noqa: N802
        raise ValueError("Cannot invoke RPC: Channel closed!")


def test_a_keepalive_on_a_closed_channel_is_an_outage_to_retry():
    stream = KeepAliveStream(ClosedChannelStub, fail_over=lambda: None)
    with pytest.raises(StoreUnavailableError, match="Channel closed"):
        stream.refresh(0x1234, timeout=1.0)


def test_a_watch_on_a_closed_channel_is_an_outage_to_retry():
    stream = WatchStream(ClosedChannelStub, fail_over=lambda: None, counter=RequestCounter(), confirm_timeout=1.0)
    with pytest.raises(StoreUnavailableError, match="Channel closed"):
        stream.add(b"/k", b"", 1, on_events=lambda events: None, on_error=lambda error: None)
