"""What HTTP itself says, shared by the proxy (engine/) and the gateway's own client (outbound/):
fields that belong to one connection, methods safe to repeat, and the Host field of an origin."""

from __future__ import annotations

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
