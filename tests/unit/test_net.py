"""rendezvous.net: one endpoint parser for the config, the store and status."""

from __future__ import annotations

import socket

import pytest

from rendezvous.net import Endpoint, endpoints_text, free_port, host_port, parse_endpoints, uses_tls


@pytest.mark.parametrize("text, expected", [
    ("etcd-0:2379", (Endpoint("etcd-0", 2379),)),
    ("http://e0:2379, e1:2380/ ,[::1]:2381", (Endpoint("e0", 2379), Endpoint("e1", 2380), Endpoint("::1", 2381))),
    ("https://10.0.0.1:2379", (Endpoint("10.0.0.1", 2379),)),
])
def test_parse_endpoints(text, expected) -> None:
    assert parse_endpoints(text) == expected
    assert parse_endpoints(text.split(",")) == expected


@pytest.mark.parametrize("bad", ["", " ", "a", "a:b", "a:1,", ":1", "a:0", "a:70000", "a b:1", "[::1:2379", "a/b:1"])
def test_bad_endpoints_are_value_errors_naming_the_item(bad) -> None:
    with pytest.raises(ValueError, match="etcd endpoint"):
        parse_endpoints(bad)


def test_tls_is_all_or_nothing() -> None:
    assert uses_tls("https://a:1,https://b:2")
    assert not uses_tls("a:1,http://b:2")
    with pytest.raises(ValueError, match="mix"):
        uses_tls("https://a:1,b:2")


def test_text_forms_bracket_ipv6() -> None:
    assert host_port("::1", 5) == "[::1]:5"
    assert endpoints_text((Endpoint("a", 1), Endpoint("::1", 2))) == "a:1,[::1]:2"


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
