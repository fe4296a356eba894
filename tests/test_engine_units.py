"""Pure functions of the engine: request-target parsing and normalization, client IP behind proxies."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest

from apigate.engine.client import split_target
from apigate.engine.paths import normalize_path
from apigate.engine.server import Gateway


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        (b"/a/b?x=1", "/a/b", b"x=1"),
        (b"/", "/", b""),
        (b"/public/../admin", "/admin", b""),
        (b"/public/%2e%2e/admin", "/admin", b""),
        (b"/a/./b//c/", "/a/b/c/", b""),
        (b"/../../etc/passwd", "/etc/passwd", b""),
        (b"http://example.com/x/y?q", "/x/y", b"q"),
        (b"*", None, b""),
        (b"example.com:443", None, b""),
    ],
)
def test_split_target(target: bytes, path: str | None, query: bytes) -> None:
    got_path, raw_path, got_query, _ = split_target(target)
    assert got_path == path
    assert got_query == query
    if path is not None:
        assert raw_path == path.encode()


def test_normalize_keeps_trailing_slash_and_root() -> None:
    assert normalize_path("/a/b/..") == "/a/"
    assert normalize_path("/..") == "/"
    assert normalize_path("//") == "/"


def client_ip(trusted: list[str], peer: str, xff: bytes) -> str:
    snapshot = SimpleNamespace(trusted_proxies=tuple(ipaddress.ip_network(n) for n in trusted))
    return Gateway.client_ip_from(None, peer, xff, snapshot)  # type: ignore[arg-type]


def test_client_ip_is_first_untrusted_hop_from_the_right() -> None:
    assert client_ip(["10.0.0.0/8"], "10.0.0.2", b"203.0.113.7, 10.0.0.9") == "203.0.113.7"
    assert client_ip(["10.0.0.0/8"], "10.0.0.2", b"198.51.100.1, 203.0.113.7") == "203.0.113.7"


def test_client_ip_when_every_hop_is_trusted_is_the_leftmost() -> None:
    assert client_ip(["10.0.0.0/8"], "10.0.0.2", b"10.1.1.1, 10.0.0.9") == "10.1.1.1"


def test_ipv4_mapped_addresses_match_ipv4_proxies() -> None:
    """A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d: it is the proxy it carries."""
    assert client_ip(["10.0.0.0/8"], "10.0.0.2", b"203.0.113.7, ::ffff:10.0.0.9") == "203.0.113.7"
    assert client_ip(["10.0.0.0/8"], "10.0.0.2", b"203.0.113.7, ::ffff:192.0.2.9") == "::ffff:192.0.2.9"
    proxies = tuple(ipaddress.ip_network(n) for n in ["10.0.0.0/8", "2001:db8::/32"])
    gateway = SimpleNamespace(plan=SimpleNamespace(trusted_proxies=proxies))
    trusted = [
        Gateway.is_trusted(gateway, ip) for ip in ["::ffff:10.1.2.3", "::ffff:11.0.0.1", "2001:db8::1"]
    ]  # type: ignore[arg-type]
    assert trusted == [True, False, True]


def test_client_ip_stops_at_a_forged_entry() -> None:
    assert client_ip(["10.0.0.0/8"], "10.0.0.2", b"not-an-ip, 10.0.0.9") == "10.0.0.2"
