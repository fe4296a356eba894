"""A real HTTP/1.1 upstream for tests, on its own thread and event loop.

Behaviour is chosen by path, so one server covers most cases:
  /echo...           JSON of method, path, query, headers, body length and sha256
  /status/{code}     answers with that status
  /delay/{ms}        answers after a delay
  /slow/{ms}         answers after a delay and, while ``hold()`` is in force, not before
                     ``release()``; ``in_flight`` and ``most_in_flight`` count these requests
  /chunked/{n}       n chunks of "chunk-i\\n" with Transfer-Encoding: chunked
  /bytes/{n}         n bytes with Content-Length, written in 64 KiB pieces with backpressure
  /eof/{n}           n bytes, no length, ended by closing the connection
  /sse/{n}           n server-sent events, 50 ms apart, without Content-Length
  /close             closes the connection without answering
  /garbage           answers something that is not HTTP
  /hop               answers with hop-by-hop headers that must not reach the client
  /made?size=&body=&type=&framing=&status=&h=
                     a body made to order: ``size`` bytes (default 4096) of ``body``
                     (``made_pieces``: lines, letters or noise; ``request``: the request's
                     own body, whatever ``size`` says), as
                     ``type`` (default text/plain; ``-``: none), framed by Content-Length (default),
                     ``chunked`` or ``eof`` (the close); ``status`` (default 200; 204 and 304
                     without a body, as HEAD); each ``h=name:value`` adds a header
  /with-headers?a=b  answers 200 with the header fields the query names (a: b; repeat a name
                     for several fields), URL-decoded
Every request is also recorded in ``requests`` (method, path, query, headers, body length, and
the first 64 KiB of the body).

With ``keeps_parsing_after_upgrade`` the server behaves like a backend that does not speak any
upgraded protocol: it answers an Upgrade request as a plain one and reads whatever follows on the
connection as further HTTP requests, so bytes a proxy tunnels after such a head are recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, parse_qsl

import httptools
import orjson

# The pieces /made writes: numbered lines of text (compressible as API bodies are), or noise.
MADE_BLOCK = 64 * 1024
_TEXT_BLOCK = b"".join(
    b'{"line": %06d, "text": "the quick brown fox jumps over the lazy dog"}\n' % i for i in range(1000)
)[:MADE_BLOCK]
# Random bytes repeated 1 MiB apart: farther than any window the gateway's codecs keep (gzip's
# 32 KiB, 512 KiB for brotli and zstd), so no codec shrinks it.
_NOISE = random.Random(7).randbytes(1 << 20)
# The same randomness as letters, spaces and line ends: text that every codec shrinks about by
# half, with no long repeats for one to skip through, so compressing it takes real work.
_LETTERS = _NOISE.translate(bytes(b"abcdefghijklmnopqrstuvwxyz  \n,.-"[i % 32] for i in range(256)))
_SOURCES = {"lines": _TEXT_BLOCK, "noise": _NOISE, "letters": _LETTERS}


def made_pieces(size: int, kind: str = "lines", piece: int = MADE_BLOCK) -> Iterator[bytes]:
    """The body of ``/made?size=...&body=kind`` in pieces of at most ``piece`` bytes: numbered JSON
    lines (``lines``, repeated every 64 KiB), ``letters`` or ``noise``."""
    source = _SOURCES[kind]
    sent = 0
    while sent < size:
        start = sent % len(source)
        chunk = source[start : start + min(piece, size - sent)]
        sent += len(chunk)
        yield chunk


def _split(body: bytes, piece: int) -> list[bytes]:
    return [body[start : start + piece] for start in range(0, len(body), piece)]


def made_body(size: int, kind: str = "lines") -> bytes:
    """The whole body of ``/made?size=...`` (for sizes a test keeps in memory)."""
    return b"".join(made_pieces(size, kind))


KEPT_BODY = 64 * 1024  # of each request body, what ``Seen.body`` keeps


@dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body_length: int = 0
    connection_id: int = 0
    query: str = ""
    body: bytes = b""  # the first KEPT_BODY bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name.lower():
                return value
        return None


@dataclass
class UpstreamServer:
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Seen] = field(default_factory=list)
    connections: int = 0
    closed: int = 0
    keeps_parsing_after_upgrade: bool = False
    in_flight: int = 0  # /slow requests being answered now
    most_in_flight: int = 0  # the most /slow requests answered at once
    gate: asyncio.Event | None = None  # /slow answers wait for it while it is there
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> UpstreamServer:
        ready = threading.Event()

        def main() -> None:
            self.loop = asyncio.new_event_loop()
            sock = socket.socket()
            sock.bind((self.host, 0))
            sock.listen(256)
            self.port = sock.getsockname()[1]
            self._server = self.loop.run_until_complete(
                self.loop.create_server(lambda: _Handler(self), sock=sock)
            )
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def hold(self) -> None:
        """From now on, /slow requests wait for ``release()`` (after their delay)."""
        self.gate = asyncio.Event()

    def release(self) -> None:
        """Let every held /slow request, and the ones to come, answer."""
        gate = self.gate
        if gate is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(gate.set)

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(5)


class _Handler(asyncio.Protocol):
    def __init__(self, server: UpstreamServer) -> None:
        self.server = server
        server.connections += 1
        self.connection_id = server.connections
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = hashlib.sha256()
        self.body_length = 0
        self.kept = bytearray()
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.closed += 1

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self.server.keeps_parsing_after_upgrade:
                self.parser = httptools.HttpRequestParser(self)
                self.data_received(data[upgrade.args[0] :])
        except httptools.HttpParserError:
            self.transport.close()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body, self.body_length = b"", [], hashlib.sha256(), 0
        self.kept = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body.update(body)
        self.body_length += len(body)
        if len(self.kept) < KEPT_BODY:
            self.kept += body[: KEPT_BODY - len(self.kept)]

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        path, _, query = self.url.decode("latin-1").partition("?")
        seen = Seen(
            method, path, list(self.headers), self.body_length, self.connection_id, query, bytes(self.kept)
        )
        self.server.requests.append(seen)
        keep_alive = self.parser.should_keep_alive()
        task = asyncio.ensure_future(self.respond(seen, query, self.body.hexdigest(), keep_alive))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    def send(
        self, status: int, body: bytes, headers: list[tuple[str, str]] = (), keep_alive: bool = True
    ) -> None:
        head = f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\ncontent-type: application/json\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers)
        if not keep_alive:
            head += "connection: close\r\n"
        self.transport.write(head.encode() + b"\r\n" + body)
        if not keep_alive:
            self.transport.close()

    async def respond(self, seen: Seen, query: str, digest: str, keep_alive: bool) -> None:
        path = seen.path
        parts = path.strip("/").split("/")
        kind, arg = parts[0], (parts[1] if len(parts) > 1 else "")
        t = self.transport
        if kind == "status":
            self.send(int(arg), orjson.dumps({"status": int(arg)}), keep_alive=keep_alive)
        elif kind == "delay":
            await asyncio.sleep(int(arg) / 1000)
            self.send(200, b'{"delayed":true}', keep_alive=keep_alive)
        elif kind == "slow":
            server = self.server
            server.in_flight += 1
            server.most_in_flight = max(server.most_in_flight, server.in_flight)
            try:
                await asyncio.sleep(int(arg) / 1000)
                if server.gate is not None:
                    await server.gate.wait()
            finally:
                server.in_flight -= 1
            if not t.is_closing():
                self.send(200, b'{"slow":true}', keep_alive=keep_alive)
        elif kind == "chunked":
            t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/plain\r\n\r\n")
            for i in range(int(arg)):
                piece = f"chunk-{i}\n".encode()
                t.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await asyncio.sleep(0)
            t.write(b"0\r\n\r\n")
        elif kind in ("bytes", "eof"):
            total = int(arg)
            framing = f"content-length: {total}\r\n" if kind == "bytes" else "connection: close\r\n"
            t.write(f"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n{framing}\r\n".encode())
            block = b"x" * 65536
            sent = 0
            while sent < total:
                await self.can_write.wait()
                piece = block[: min(65536, total - sent)]
                t.write(piece)
                sent += len(piece)
            if kind == "eof":
                t.close()
        elif kind == "sse":
            t.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            for i in range(int(arg or 3)):
                event = f"data: event-{i}\n\n".encode()
                t.write(b"%x\r\n%s\r\n" % (len(event), event))
                await asyncio.sleep(0.05)
            t.write(b"0\r\n\r\n")
        elif kind == "close":
            t.close()
        elif kind == "garbage":
            t.write(b"this is not http\r\n\r\n")
            t.close()
        elif kind == "hop":
            self.send(
                200,
                b"{}",
                [
                    ("connection", "x-secret-hop"),
                    ("x-secret-hop", "1"),
                    ("keep-alive", "timeout=5"),
                    ("proxy-authenticate", "Basic"),
                    ("x-kept", "yes"),
                ],
            )
        elif kind == "with-headers":
            self.send(200, b"{}", parse_qsl(query, keep_blank_values=True), keep_alive=keep_alive)
        elif kind == "ssegate":
            # Like /sse/{n}, but events after the first wait for ``server.proxy_gate`` (a
            # threading.Event the test attaches and sets), which proves the proxy does not buffer.
            t.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            for i in range(int(arg or 2)):
                if i == 1:
                    gate = self.server.proxy_gate  # type: ignore[attr-defined]
                    await asyncio.get_running_loop().run_in_executor(None, gate.wait, 30)
                event = f"data: event-{i}\n\n".encode()
                t.write(b"%x\r\n%s\r\n" % (len(event), event))
            t.write(b"0\r\n\r\n")
        elif kind == "made":
            await self.made(seen, query)
        elif kind == "sized":
            # n bytes with Content-Length, and no body at all for HEAD (as RFC 9110 requires).
            total = int(arg)
            t.write(
                f"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {total}\r\n\r\n".encode()
            )
            if seen.method != "HEAD":
                t.write(b"s" * total)
        else:
            payload = {
                "method": seen.method,
                "path": path,
                "query": query,
                "headers": dict(seen.headers),
                "body_length": seen.body_length,
                "body_sha256": digest,
                "connection_id": self.connection_id,
            }
            self.send(200, orjson.dumps(payload), keep_alive=keep_alive)

    async def made(self, seen: Seen, query: str) -> None:
        args = parse_qs(query)
        size = int(args.get("size", ["4096"])[0])
        framing = args.get("framing", ["length"])[0]
        status = int(args.get("status", ["200"])[0])
        kind = args.get("body", ["lines"])[0]
        content_type = args.get("type", ["text/plain"])[0]
        head = [f"HTTP/1.1 {status} X"] + ([f"content-type: {content_type}"] if content_type != "-" else [])
        head += [h.replace(":", ": ", 1) for h in args.get("h", [])]
        bodiless = seen.method == "HEAD" or status in (204, 304)
        if kind == "request":  # the request's own body (its first KEPT_BODY bytes) comes back
            size = len(seen.body)
        if framing == "length" and status != 204:
            head.append(f"content-length: {size}")
        elif framing == "chunked" and not bodiless:
            head.append("transfer-encoding: chunked")
        elif framing == "eof":
            head.append("connection: close")
        t = self.transport
        t.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if not bodiless:
            pieces = (
                _split(seen.body, 4096 if framing == "chunked" else MADE_BLOCK)
                if kind == "request"
                else made_pieces(size, kind, 4096 if framing == "chunked" else MADE_BLOCK)
            )
            for piece in pieces:
                await self.can_write.wait()
                t.write(b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece)
            if framing == "chunked":
                t.write(b"0\r\n\r\n")
        if framing == "eof":
            t.close()
