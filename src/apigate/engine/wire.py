"""HTTP/1.1 wire helpers shared by both sides of the proxy: header sets, status lines, error
bodies, request ids, and the reading of plain messages that both connection types share.

The tables here are precomputed at import so the hot path only looks things up.
"""

from __future__ import annotations

import asyncio
import os
from http import HTTPStatus
from typing import Final

METHODS: Final = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")
}

# What the proxy forwards, for the Allow field of a refused method.
ALLOWED_METHODS: Final = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
# Every registered status's line, made once; the hot path reads this dict directly.
STATUS_LINES: Final[dict[int, bytes]] = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, reason) for code, reason in _REASONS.items()
}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Unknown\r\n" % status
        STATUS_LINES[status] = line
    return line


def add_headers(out: list[bytes], headers: list[tuple[bytes, bytes]]) -> None:
    """Append the lines of ``headers`` to ``out`` as pieces; one join makes the head at the end
    (cheaper than formatting each line)."""
    for name, value in headers:
        out.append(name)
        out.append(b": ")
        out.append(value)
        out.append(b"\r\n")


def serialize_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    out: list[bytes] = []
    add_headers(out, headers)
    return b"".join(out)


# Request fields the proxy reads itself, each with its kind: the exchange reads them all in one
# pass over the head (one dict probe per field), dispatching on the kind.
FIELD_HOST: Final = 0
FIELD_CONTENT_LENGTH: Final = 1
FIELD_TRANSFER_ENCODING: Final = 2
FIELD_X_FORWARDED_FOR: Final = 3
FIELD_X_REQUEST_ID: Final = 4
FIELD_EXPECT: Final = 5
FIELD_CONNECTION: Final = 6
FIELD_X_FORWARDED_PROTO: Final = 7
FIELD_X_FORWARDED_HOST: Final = 8
FIELD_TRACEPARENT: Final = 9
PROXY_READ_FIELDS: Final = {
    b"host": FIELD_HOST,
    b"content-length": FIELD_CONTENT_LENGTH,
    b"transfer-encoding": FIELD_TRANSFER_ENCODING,
    b"x-forwarded-for": FIELD_X_FORWARDED_FOR,
    b"x-request-id": FIELD_X_REQUEST_ID,
    b"expect": FIELD_EXPECT,
    b"connection": FIELD_CONNECTION,
    b"x-forwarded-proto": FIELD_X_FORWARDED_PROTO,
    b"x-forwarded-host": FIELD_X_FORWARDED_HOST,
    b"traceparent": FIELD_TRACEPARENT,
}

PLAIN_CONNECTION: Final = frozenset(
    {b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade"}
)


def connection_tokens(value: bytes) -> set[bytes] | None:
    """Field names listed in a Connection header (lowercased), minus the keep-alive/close words."""
    if value in PLAIN_CONNECTION:
        return None
    return {t.strip().lower() for t in value.split(b",")} - {b"close", b"keep-alive", b""}


class HexCounter:
    """Successive numbers, xored with ``mask``, as ``width`` hex digits after ``prefix``. Formatting
    a number per call costs more than the rest of making an id, so the leading digits are
    formatted once per 4,096 numbers and the last three come from a table."""

    def __init__(self, prefix: bytes, width: int, mask: int) -> None:
        self.prefix = prefix
        self.width = width
        self.mask = mask & ((1 << (4 * width)) - 1)
        self.count = 0
        self.block = -1
        self.lead = b""  # the prefix and the leading digits of the current block

    def next(self) -> bytes:
        count = self.count = self.count + 1
        block = count >> 12
        if block != self.block:
            self.block = block
            high = ((self.mask >> 12) ^ block) & ((1 << (4 * (self.width - 3))) - 1)
            self.lead = self.prefix + b"%0*x" % (self.width - 3, high)
        return self.lead + _LAST_DIGITS[(self.mask ^ count) & 0xFFF]


_LAST_DIGITS: Final = [b"%03x" % n for n in range(4096)]


class RequestIds:
    """Request ids of 32 hex digits: a random per-process prefix and a counter (unique, and
    cheap to make; compiled here because every request without an id of its own needs one)."""

    def __init__(self) -> None:
        self.counter = HexCounter(os.urandom(8).hex().encode(), 16, 0)

    def next(self) -> bytes:
        return self.counter.next()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


class HeadReader(asyncio.Protocol):
    """A connection that reads plain messages itself and leaves the rest to llhttp.

    ``read_plain`` takes the plain messages off the front of incoming data: a head through
    ``plain_head`` (the subclass asks engine/heads.py, a compiled reader), a Content-Length
    body counted here. What it returns is for llhttp, which then reads on until the end of
    that message (``parser_busy``, set from llhttp's callbacks).
    """

    __slots__ = ("body_left", "parser_busy")

    def __init__(self) -> None:
        self.parser_busy = False  # llhttp is inside a message: it reads everything until its end
        self.body_left = 0  # body bytes still to come for a head read by plain_head

    def read_plain(self, data: bytes) -> bytes:
        while True:
            left = self.body_left
            if left:
                if len(data) < left:
                    self.body_left = left - len(data)
                    self.on_body(data)
                    return b""
                self.body_left = 0
                self.on_body(data[:left] if len(data) > left else data)
                data = data[left:]
                self.on_message_complete()
                if not data:
                    return b""
            end = self.plain_head(data)
            if end < 0:
                return data
            data = data[end:]
            if not data:
                return b""

    def plain_head(self, data: bytes) -> int:
        """Handle the plain head at the start of ``data``; returns where it ends, or -1 to leave
        it to llhttp. Sets ``body_left``, or completes a message without a body."""
        raise NotImplementedError

    def on_body(self, body: bytes) -> None:
        raise NotImplementedError

    def on_message_complete(self) -> None:
        raise NotImplementedError
