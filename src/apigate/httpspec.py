"""What HTTP itself says, shared by the proxy (engine/) and the gateway's own client (outbound/):
fields that belong to one connection, methods safe to repeat, the Host field of an origin, and
the peer addresses that network allow-lists match."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

# RFC 9110 §7.6.1: connection-specific fields never cross a proxy. ``proxy-connection`` is a
# non-standard relic that some clients still send. ``te`` and ``trailer`` are per hop too.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# RFC 9110 §9.2.2: a request with one of these methods may be sent again without a new effect.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})


def host_field(scheme: str, host: str, port: int | None) -> bytes:
    """The Host field for an origin (RFC 9110 §7.2): IPv6 literals in brackets, the port only when
    it is not the scheme's default, a non-ASCII name in its IDNA form."""
    shown = f"[{host}]" if ":" in host else host
    default_port = 443 if scheme == "https" else 80
    if port is not None and port != default_port:
        shown += f":{port}"
    try:
        return shown.encode("ascii")
    except UnicodeEncodeError:
        return shown.encode("idna")


def peer_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address ``text`` names (ValueError if none), an IPv4-mapped IPv6 address
    (``::ffff:10.0.0.9``, as a dual-stack socket reports an IPv4 peer) as the IPv4 one it carries."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_in(text: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """``text`` is an address in one of ``networks`` (an IPv4-mapped one as its IPv4 address)."""
    try:
        address = peer_address(text)
    except ValueError:
        return False
    return any(address in network for network in networks)


def cookie_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of cookie ``name`` in the Cookie header(s) of a request (RFC 6265 §5.4), quotes
    and spaces taken off, or None when it is absent."""
    for field, value in headers:
        if field != b"cookie":
            continue
        for pair in value.split(b";"):
            key, sep, found = pair.strip().partition(b"=")
            if sep and key == name:
                return found.strip(b'" ')
    return None
