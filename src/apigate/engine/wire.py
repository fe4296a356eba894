"""HTTP/1.1 wire helpers shared by both sides of the proxy: header sets, status lines, error bodies.

Everything here is precomputed at import so the hot path only looks things up.
"""

from __future__ import annotations

from http import HTTPStatus

import orjson

# RFC 9110 §7.6.1: connection-specific fields never cross a proxy. ``proxy-connection`` is a
# non-standard relic that some clients still send. ``te`` and ``trailer`` are per hop too.
HOP_BY_HOP = frozenset(
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

METHODS = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")
}

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
# Every registered status's line, made once; the hot path reads this dict directly.
STATUS_LINES: dict[int, bytes] = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()
}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Unknown\r\n" % status
        STATUS_LINES[status] = line
    return line


def serialize_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join([b"%s: %s\r\n" % pair for pair in headers])


PLAIN_CONNECTION = frozenset({b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade"})


def connection_tokens(value: bytes) -> set[bytes] | None:
    """Field names listed in a Connection header (lowercased), minus the keep-alive/close words."""
    if value in PLAIN_CONNECTION:
        return None
    return {t.strip().lower() for t in value.split(b",")} - {b"close", b"keep-alive", b""}


def error_body(message: str, request_id: str) -> bytes:
    return orjson.dumps({"error": message, "request_id": request_id})


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
