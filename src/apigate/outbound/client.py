"""A small HTTP/1.1 client for the gateway's own outbound calls (JWKS and discovery documents,
token introspection, webhook deliveries).

Why not a general-purpose client library: these calls run on the gateway's own event loop, next
to the data plane, and must never block it; this client parses with httptools (llhttp, the same
parser the engine uses for upstream responses) and adds no dependency. It does what those
callers need and nothing more:

- http and https (the default CA store, or a given ``ssl.SSLContext``); names are resolved in
  the loop's executor and TLS is asynchronous, so nothing here blocks;
- keep-alive connections pooled per origin (scheme, host, port): at most
  ``max_connections_per_origin`` open at once (more callers wait for one, within their timeout),
  the most recently used is reused first, and an idle one closes after ``idle_timeout``; or,
  with ``keep_alive=False``, a new connection per request, sent with ``Connection: close`` and
  closed after the response (health probes: a dead server shows as a failed connect);
- responses framed by Content-Length, chunked, or the end of the connection; a response with
  ``Connection: close`` (or HTTP/1.0 without keep-alive) closes its connection; 1xx interim
  answers are skipped; a HEAD response has no body;
- a pooled connection the server had already dropped fails before any response byte: the
  request is then sent once more on a new connection, for idempotent requests only (a POST is
  never sent twice unless the caller says it is safe);
- a cap on the response body (``max_body``) and head, and one deadline per request
  (``timeout``: waiting for a connection, connecting, TLS, sending and reading all count).

No redirects, proxies, cookies or compression. A failed exchange raises ``OutboundError`` with a
``kind``; a request that is malformed before anything is sent (not an http(s) URL, a header
with a line break) raises ``ValueError``.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import ssl
from collections import deque
from typing import Any, Literal
from urllib.parse import urlsplit

import httptools

from apigate import __version__
from apigate.httpspec import IDEMPOTENT_METHODS, host_field

ErrorKind = Literal["connect", "timeout", "protocol", "too_large", "tls"]

MAX_HEAD_BYTES = 64 * 1024  # status line and headers of a response
MAX_RETRY_AFTER = 86400.0  # the longest pause a Retry-After may ask for
USER_AGENT = f"apigate/{__version__}".encode()

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_UNSAFE_VALUE = re.compile(rb"[\x00\r\n]")
_UNSAFE_TARGET = re.compile(r"[\x00-\x20\x7f]")
# The client frames requests itself; a caller's copy of these would contradict it.
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_BODY_EXPECTED = frozenset({"POST", "PUT", "PATCH"})


class OutboundError(Exception):
    """An outbound request that failed; ``kind`` says how, ``message`` says it for people.

    kinds: ``connect`` (no connection, or it was lost before a response began), ``timeout``,
    ``protocol`` (not valid HTTP/1.x, or the response ended early), ``too_large`` (body or head
    over the cap), ``tls`` (handshake or certificate).
    """

    def __init__(self, message: str, kind: ErrorKind) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


class Response:
    """A complete response; header names are lower-case, in the order received."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header, or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def __repr__(self) -> str:
        return f"<Response {self.status}, {len(self.body)} bytes>"


def retry_after(value: bytes | None, now: float) -> float | None:
    """Seconds from a Retry-After value (RFC 9110 §10.2.3: delta-seconds or an HTTP date), capped at a day."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        seconds = float(text)
    else:
        try:
            seconds = email.utils.parsedate_to_datetime(text).timestamp() - now
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


_default_tls: ssl.SSLContext | None = None


def default_tls_context() -> ssl.SSLContext:
    """One client TLS context per process (building one reads the CA store: ~50 ms, so never per call)."""
    global _default_tls
    if _default_tls is None:
        _default_tls = ssl.create_default_context()
    return _default_tls


class _Origin:
    __slots__ = ("host", "host_header", "port", "scheme")

    def __init__(self, scheme: str, host: str, port: int, host_header: bytes) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.host_header = host_header

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _split_url(url: str) -> tuple[_Origin, str]:
    """(origin, request target) of an http(s) URL; ValueError otherwise."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError("the URL must start with http:// or https://")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the URL's port is not a number from 0 to 65535") from None
    host = parts.hostname
    if not host:
        raise ValueError("the URL names no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the URL must not carry credentials; send them in a header")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if _UNSAFE_TARGET.search(target):
        raise ValueError("the URL's path or query holds spaces or control characters")
    default_port = 443 if scheme == "https" else 80
    return _Origin(scheme, host, port or default_port, host_field(scheme, host, port)), target


def _request_head(
    method: str,
    origin: _Origin,
    target: str,
    headers: list[tuple[bytes, bytes]] | None,
    body: bytes,
    close: bool = False,
) -> bytes:
    if not _TOKEN.fullmatch(method.encode("latin-1", "replace")):
        raise ValueError(f"{method!r} is not an HTTP method")
    lines = [f"{method} {target} HTTP/1.1\r\n".encode()]
    names = set()
    for name, value in headers or ():
        lowered = name.lower()
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid header name")
        if _UNSAFE_VALUE.search(value):
            raise ValueError(f"the value of header {name.decode()!r} holds a line break or NUL")
        if lowered in _FRAMING:
            raise ValueError(f"{name.decode()} is set by the client itself")
        names.add(lowered)
        lines.append(name + b": " + value + b"\r\n")
    if b"host" not in names:
        lines.insert(1, b"Host: " + origin.host_header + b"\r\n")
    if b"user-agent" not in names:
        lines.append(b"User-Agent: " + USER_AGENT + b"\r\n")
    if body or method in _BODY_EXPECTED:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class _Reading:
    """httptools callbacks collecting one response, with bounds on its head and body."""

    def __init__(self, future: asyncio.Future[Response], head_only: bool, max_body: int) -> None:
        self.future = future
        self.parser = httptools.HttpResponseParser(self)
        self.head_only = head_only
        self.max_body = max_body
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.framed = False  # Content-Length or chunked: the parser knows where the body ends
        self.headers_done = False
        self.interim = False
        self.received = False  # any byte of a response arrived
        self.finished = False
        self.reusable = False
        self.failure: OutboundError | None = None

    # -- fed by the connection -----------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(self.failure or OutboundError("invalid HTTP response", "protocol"))

    def lost(self) -> None:
        """The connection ended (closed by the server, reset, or closed by us)."""
        if self.finished:
            return
        if self.headers_done and not self.framed and not self.interim:
            self._finish(reusable=False)  # a body delimited by the connection's end
        elif not self.received:
            self._fail(OutboundError("the connection closed before a response arrived", "connect"))
        else:
            self._fail(OutboundError("the connection closed before the response was complete", "protocol"))

    # -- llhttp callbacks ------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.finished:  # a second response to one request
            self.reusable = False
        self.headers = []
        self.head_bytes = 0

    def on_status(self, status: bytes) -> None:
        self._count_head(len(status))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        name = name.lower()
        if name in (b"content-length", b"transfer-encoding"):
            self.framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim = True  # 103 Early Hints and the like: the real answer follows
            return
        if status == 101:  # this client never asks to switch protocols
            self._stop(OutboundError("the server switched protocols unasked", "protocol"))
        self.status = status
        self.headers_done = True
        if self.head_only:
            self._finish(reusable=self.parser.should_keep_alive())
            return
        length = self._header(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            self._stop(self._too_large())

    def on_body(self, body: bytes) -> None:
        if self.finished:  # a body after a HEAD response
            self.reusable = False
            return
        self.body_bytes += len(body)
        if self.body_bytes > self.max_body:
            self._stop(self._too_large())
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            self.framed = False
            return
        if not self.finished:
            self._finish(reusable=self.parser.should_keep_alive())

    # -- helpers -------------------------------------------------------------------------------------
    def _header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def _count_head(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD_BYTES:
            self._stop(
                OutboundError(f"the response head is too large (over {MAX_HEAD_BYTES} bytes)", "too_large")
            )

    def _too_large(self) -> OutboundError:
        return OutboundError(f"the response body is too large (over {self.max_body} bytes)", "too_large")

    def _stop(self, failure: OutboundError) -> None:
        """Abort parsing from inside a callback; ``feed`` reports ``failure``."""
        self.failure = failure
        raise failure

    def _finish(self, reusable: bool) -> None:
        self.finished = True
        self.reusable = reusable
        if not self.future.done():
            self.future.set_result(Response(self.status, self.headers, b"".join(self.body)))

    def _fail(self, failure: OutboundError) -> None:
        self.finished = True
        self.reusable = False
        if not self.future.done():
            self.future.set_exception(failure)


class _Connection(asyncio.Protocol):
    """One connection to an origin; carries one request at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.counted = True  # holds one of the pool's slots until forgotten
        self.used = False  # carried a request before: it may have been dropped while idle
        self.idle_timer: asyncio.TimerHandle | None = None
        self.reading: _Reading | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        reading = self.reading
        if reading is None:  # an idle connection must stay silent
            self.close()
            return
        reading.feed(data)
        if reading.finished:
            self.reading = None
            if reading.reusable:
                self.pool.release(self)
            else:
                self.close()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        reading, self.reading = self.reading, None
        if reading is not None:
            reading.lost()

    async def exchange(self, request: bytes, head_only: bool, max_body: int) -> Response:
        """Send a request and wait for its response; the connection returns to the pool by itself
        when the response allows it, and is closed otherwise (also when the caller gives up)."""
        assert self.transport is not None
        reading = _Reading(asyncio.get_running_loop().create_future(), head_only, max_body)
        self.reading = reading
        self.used = True
        try:
            self.transport.write(request)
            return await reading.future
        finally:
            if not reading.finished or not reading.reusable:
                self.reading = None
                self.close()

    def close(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self.pool.forget(self)


class _Pool:
    """The connections to one origin: idle ones (most recently used last) and a cap on open ones."""

    def __init__(self, client: HttpClient, origin: _Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.origin = origin
        self.loop = loop
        self.idle: deque[_Connection] = deque()
        self.connections: set[_Connection] = set()
        self.opening = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> _Connection:
        while True:
            if self.client.closed:
                raise OutboundError("the client was closed", "connect")
            while self.idle:
                conn = self.idle.pop()  # the most recently used: the least likely to be stale
                if conn.idle_timer is not None:
                    conn.idle_timer.cancel()
                    conn.idle_timer = None
                if not conn.closed:
                    return conn
            if len(self.connections) + self.opening < self.client.max_connections_per_origin:
                return await self._connect()
            waiter = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # the turn this waiter was given goes to the next one
                raise

    async def _connect(self) -> _Connection:
        self.opening += 1
        try:
            conn = await self._open()
        except BaseException:
            self.opening -= 1
            self._wake()  # the slot is free again
            raise
        self.opening -= 1
        if conn.closed:  # the server hung up before this coroutine resumed
            self._wake()
            raise OutboundError(f"{self.origin} closed the connection at once", "connect")
        self.connections.add(conn)
        return conn

    async def _open(self) -> _Connection:
        origin = self.origin
        tls = self.client.tls_context if origin.scheme == "https" else None
        try:
            _, conn = await self.loop.create_connection(
                lambda: _Connection(self),
                origin.host,
                origin.port,
                ssl=tls,
                server_hostname=origin.host if tls is not None else None,
            )
        except ssl.SSLError as exc:  # before OSError: SSLError is one
            reason = exc.reason or type(exc).__name__
            raise OutboundError(f"TLS with {origin} failed: {reason}", "tls") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise OutboundError(f"cannot connect to {origin}: {reason}", "connect") from None
        except UnicodeError:
            raise OutboundError(f"cannot connect to {origin}: invalid host name", "connect") from None
        return conn

    def release(self, conn: _Connection) -> None:
        """A connection whose response is complete and which may carry another request."""
        if conn.closed or self.client.closed or not self.client.keep_alive:
            conn.close()
            return
        conn.idle_timer = self.loop.call_later(self.client.idle_timeout, conn.close)
        self.idle.append(conn)
        self._wake()

    def forget(self, conn: _Connection) -> None:
        """A connection closed: free its slot (idempotent)."""
        if not conn.counted:
            return
        conn.counted = False
        self.connections.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        self._wake()

    def drop_idle(self) -> None:
        """Close every idle connection (one of them was found dropped by the server: the others,
        idle as long or longer, most likely were too)."""
        while self.idle:
            self.idle.popleft().close()

    def close(self) -> None:
        for conn in list(self.connections):
            conn.close()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(OutboundError("the client was closed", "connect"))

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class HttpClient:
    """Pooled HTTP/1.1 requests on the running loop; see the module docstring.

    One client serves any number of origins and concurrent requests. It binds to the loop it is
    first used on; used from another loop (tests run several), it starts with empty pools there.
    """

    def __init__(
        self,
        max_connections_per_origin: int = 10,
        idle_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        keep_alive: bool = True,
    ) -> None:
        if max_connections_per_origin < 1:
            raise ValueError("max_connections_per_origin must be at least 1")
        self.max_connections_per_origin = max_connections_per_origin
        self.idle_timeout = idle_timeout
        self.keep_alive = keep_alive  # False: one connection per request, never pooled
        self._tls = ssl_context
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pools: dict[tuple[str, str, int], _Pool] = {}

    @property
    def tls_context(self) -> ssl.SSLContext:
        return self._tls if self._tls is not None else default_tls_context()

    async def request(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
        timeout: float = 10.0,
        max_body: int = 1 << 20,
        idempotent: bool | None = None,
    ) -> Response:
        """Send one request and return the whole response (any status); OutboundError on failure.

        ``idempotent`` says whether sending the request twice is harmless (default: by method;
        a POST that only queries, such as token introspection, may say True)."""
        if self.closed:
            raise RuntimeError("the HttpClient is closed")
        origin, target = _split_url(url)
        request = _request_head(method, origin, target, headers, body, not self.keep_alive) + body
        pool = self._pool(origin)
        retry_stale = method in IDEMPOTENT_METHODS if idempotent is None else idempotent
        try:
            async with asyncio.timeout(timeout):
                while True:
                    conn = await pool.acquire()
                    reused = conn.used
                    try:
                        return await conn.exchange(request, method == "HEAD", max_body)
                    except OutboundError as exc:
                        # A pooled connection the server had closed fails with "connect" before
                        # any response byte; the request may not have been processed, but only an
                        # idempotent one is safe to send again.
                        if retry_stale and reused and exc.kind == "connect":
                            retry_stale = False
                            pool.drop_idle()
                            continue
                        raise
        except TimeoutError:
            raise OutboundError(f"timed out: no complete response within {timeout:g}s", "timeout") from None

    def _pool(self, origin: _Origin) -> _Pool:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._pools = {}  # connections of another loop cannot be used on this one
        pool = self._pools.get(origin.key)
        if pool is None:
            pool = self._pools[origin.key] = _Pool(self, origin, loop)
        return pool

    async def close(self) -> None:
        """Close every connection; requests in flight fail, later ones raise RuntimeError."""
        self.closed = True
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()
