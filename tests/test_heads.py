"""The plain-head reader agrees with llhttp on every head it accepts, and leaves the rest to it.

These run on the Python source of engine/heads.py; test_compiled_engine.py runs the same
checks on the Cython-compiled module.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import httptools
import pytest

from apigate.engine import heads as source_heads


class Recorder:
    """What llhttp reports for one message, in the shape the reader returns."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser | None = None
        self.keep_alive: bool | None = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        # Asked here, as the engine does: llhttp forgets it once the message is complete.
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()


def llhttp_read(parser_type: type, data: bytes) -> tuple[Recorder, Any] | None:
    """llhttp's reading of the head at the start of ``data``; None if it refuses it or it is incomplete."""
    recorder = Recorder()
    parser = recorder.parser = parser_type(recorder)
    try:
        parser.feed_data(data)
    except httptools.HttpParserError:
        return None
    return (recorder, parser) if recorder.keep_alive is not None else None


def llhttp_request(data: bytes) -> tuple | None:
    read = llhttp_read(httptools.HttpRequestParser, data)
    if read is None:
        return None
    recorder, parser = read
    version = parser.get_http_version()
    return parser.get_method().decode(), recorder.url, recorder.headers, version, recorder.keep_alive


def llhttp_response(data: bytes) -> tuple | None:
    read = llhttp_read(httptools.HttpResponseParser, data)
    if read is None:
        return None
    recorder, parser = read
    return parser.get_status_code(), recorder.headers, recorder.keep_alive


REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n",
    b"GET /a/b?x=1&y=%20 HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nUser-Agent: curl/8\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT /x HTTP/1.0\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"DELETE /x HTTP/1.1\r\nX-Empty:\r\nX-Spaces:   a  b  \r\nX-Tab:\tv\tw\r\n\r\n",
    b"OPTIONS /x HTTP/1.1\r\nX-Weird-Name!#$%&'*+.^_`|~: v\r\n\r\n",
    # Left to llhttp:
    b"GET / HTTP/1.1\r\nHost: h\r\n",  # incomplete
    b"GET http://h/x HTTP/1.1\r\n\r\n",  # absolute form
    b"CONNECT h:443 HTTP/1.1\r\n\r\n",
    b"PROPFIND / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    b"GET / HTTP/1.1\r\nContent-Length: +1\r\n\r\nx",
    b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: keep-alive, x-hop\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n",  # bare LF
    b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",  # bare CR
    b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: caf\xc3\xa9\r\n\r\n",  # obs-text: llhttp accepts, left to it
    b"GET / HTTP/1.1\r\nX : a\r\n\r\n",
    b"GET / HTTP/1.1\r\nX\xe9: a\r\n\r\n",  # a letter, but not ASCII
    b"GET /caf\xe9 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nX(: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
    b"GET /a\tb HTTP/1.1\r\n\r\n",
    b"GET /a b HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.2\r\n\r\n",
    b"GET / HTTP/1.1\n\r\n",
    b"get / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nProxy-Connection: close\r\n\r\n",  # llhttp reads it as Connection
    b"GET / HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n",
]

RESPONSES = [
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Connection: keep-alive\r\n\r\n{}",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    b"HTTP/1.1 500 \r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nSet-Cookie: a=b; Path=/\r\nX-Empty:\r\nContent-Length: 0\r\n\r\n",
    # Left to llhttp:
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n",  # incomplete
    b"HTTP/1.1 200 OK\r\n\r\nuntil close",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close, x-hop\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nProxy-Connection: close\r\n\r\n",
]


def check_requests(heads: ModuleType) -> None:
    for data in REQUESTS:
        got = heads.read_request(data, 8192)
        if got is None:
            continue  # llhttp reads it, whatever it makes of it
        method, target, headers, version, keep_alive, length, end = got
        assert llhttp_request(data) == (method, target, headers, version, keep_alive), data
        assert data[end:] == data[len(data) - length :] if length else data[end:] == b"", data
    accepted = {data for data in REQUESTS if heads.read_request(data, 8192) is not None}
    assert len(accepted) == 8, "the plain requests above must be read without llhttp"


def check_responses(heads: ModuleType) -> None:
    for data in RESPONSES:
        got = heads.read_response(data, 8192)
        if got is None:
            continue
        status, headers, keep_alive, length, end = got
        assert llhttp_response(data) == (status, headers, keep_alive), data
        assert len(data) - end == (0 if status in (204, 304) else length), data
    accepted = {data for data in RESPONSES if heads.read_response(data, 8192) is not None}
    assert len(accepted) == 9, "the plain responses above must be read without llhttp"


def check_limits(heads: ModuleType) -> None:
    request = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    # The reader keeps a byte a header of margin below the limit; closer, llhttp decides (431 or not).
    assert heads.read_request(request, len(request) + 1) is not None
    assert heads.read_request(request, len(request)) is None
    # Headers without a space after the colon: llhttp counts 4 bytes each beyond name and value,
    # one more than they take; near the limit the reader leaves the 431 decision to llhttp.
    tight = b"GET / HTTP/1.1\r\n" + b"a:\r\n" * 2043 + b"\r\n"
    assert len(tight) <= 8192 and heads.read_request(tight, 8192) is None
    assert (
        heads.read_response(b"HTTP/1.1 200 OK\r\n" + b"a:\r\n" * 2040 + b"Content-Length: 0\r\n\r\n", 8192)
        is None
    )
    pipelined = request + b"GET /2 HTTP/1.1\r\n\r\n"
    assert heads.read_request(pipelined, 8192)[-1] == len(request)
    # Names are lowercased, and the same name object is shared between heads.
    first = heads.read_request(b"GET / HTTP/1.1\r\nX-Trace-Id: 1\r\n\r\n", 8192)[2][0][0]
    second = heads.read_request(b"GET / HTTP/1.1\r\nx-trace-id: 2\r\n\r\n", 8192)[2][0][0]
    assert first == b"x-trace-id" and first is second


def check_every_byte(heads: ModuleType) -> None:
    """Each byte value in a target, a name, a value and a reason: read as llhttp reads it, or left to it."""
    cases = [
        (heads.read_request, llhttp_request, 5, [b"GET /a%sb HTTP/1.1\r\n", b"GET / HTTP/1.1\r\n%s"]),
        (heads.read_response, llhttp_response, 3, [b"HTTP/1.1 200 O%sK\r\n", b"HTTP/1.1 200 OK\r\n%s"]),
    ]
    for read, llhttp, fields, (first_line, with_header) in cases:
        for byte in (bytes([b]) for b in range(256)):
            for data in (
                first_line % byte + b"Content-Length: 0\r\n\r\n",
                with_header % (b"A" + byte + b"b: v\r\nContent-Length: 0\r\n\r\n"),
                with_header % (b"A: v" + byte + b"w\r\nContent-Length: 0\r\n\r\n"),
            ):
                got = read(data, 8192)
                if got is not None:
                    assert llhttp(data) == got[:fields], data


def check_long_values(heads: ModuleType) -> None:
    """Each byte value at each offset of a long value: the compiled reader skips plain values a
    word (8 bytes) at a time, so a bad byte must stop it in any position of a word."""
    for byte in (bytes([b]) for b in range(256)):
        for offset in range(17):
            value = b"v" * offset + byte + b"w" * (24 - offset)
            for read, llhttp, fields, first_line in (
                (heads.read_request, llhttp_request, 5, b"GET / HTTP/1.1\r\n"),
                (heads.read_response, llhttp_response, 3, b"HTTP/1.1 200 OK\r\n"),
            ):
                data = first_line + b"A: " + value + b"\r\nContent-Length: 0\r\n\r\n"
                got = read(data, 8192)
                if got is not None:
                    assert llhttp(data) == got[:fields], data
                    assert got[2 if fields == 5 else 1][0][1] == value.lstrip(b" \t"), data
                else:  # refused only for a byte that is not plain text (llhttp still reads tabs)
                    assert not 32 <= byte[0] < 127, data


def check_all(heads: ModuleType) -> None:
    check_requests(heads)
    check_responses(heads)
    check_limits(heads)
    check_every_byte(heads)
    check_long_values(heads)


@pytest.mark.parametrize(
    "check", [check_requests, check_responses, check_limits, check_every_byte, check_long_values]
)
def test_reader_agrees_with_llhttp(check) -> None:
    check(source_heads)
