"""Pooled keep-alive connections to upstream servers.

Written by hand on the proxy's hot path: a general-purpose HTTP client does far more per request
than the proxy needs, which is only one thing: write a request head, stream bytes, and
read what comes back (plain heads with engine/heads.py when compiled, the rest with llhttp),
with the connection returned to a per-target pool.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import httptools

from apigate.engine import heads, wire

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange


# Plain heads are read by the compiled reader; llhttp reads the rest (and all when uncompiled).
READ_HEADS: Final = heads.COMPILED
# The largest response head; past it the answer is 502. llhttp has no limit of its own.
MAX_RESPONSE_HEAD: Final = 64 * 1024
# A chunked body's framing (sizes, extensions, trailers) read without a byte of data; past it: 502.
MAX_CHUNK_FRAMING: Final = 16 * 1024
# Raw bytes of an unfinished head may exceed the limit by this much (status line, CRLFs).
HEAD_SLACK: Final = 1024


class PoolTimeout(Exception):
    """No connection slot freed up within the connect timeout."""


class UpstreamConnection(wire.HeadReader):
    __slots__ = (
        "closed",
        "exchange",
        "framing_bytes",
        "head_bytes",
        "head_only",
        "head_read",
        "headers",
        "idle_since",
        "in_head",
        "interim",
        "lost",
        "parser",
        "pool",
        "reset_parser",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: ConnectionPool) -> None:
        super().__init__()
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.in_head = False  # llhttp is reading a response head
        self.head_bytes = 0  # of that head's finished fields (or of the trailers), exactly
        self.head_read = 0  # bytes read while a head was unfinished (see read_with_llhttp)
        self.framing_bytes = 0  # chunked-body framing read since the last body byte
        self.idle_since = 0.0
        self.closed = False
        self.lost = False
        self.interim = False
        self.head_only = False
        self.reset_parser = False
        self.tunnel = False

    # -- transport events -------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:  # (already reported by a send that found the transport closed)
            return
        self.lost = True
        self.closed = True
        exchange = self.exchange
        self.exchange = None
        self.pool.forget(self)
        if exchange is not None:
            exchange.upstream_lost(self, exc)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # an idle connection must stay silent; anything else is a broken peer
            self.close()
            return
        if self.tunnel:
            exchange.tunnel_to_client(data)
            return
        exchange.seen = True
        client = exchange.client
        client.cork()
        try:
            if READ_HEADS and not self.parser_busy:
                data = self.read_plain(data)
            if data:
                self.read_with_llhttp(exchange, data)
        finally:
            client.uncork()
        if self.reset_parser:
            # llhttp cannot be told a response answers HEAD, so it would wait for a body that
            # never comes; a fresh parser starts the next response cleanly.
            self.reset_parser = False
            self.parser_busy = False
            self.parser = httptools.HttpResponseParser(self)

    def read_with_llhttp(self, exchange: Exchange, data: bytes) -> None:
        in_head = self.in_head
        in_body = self.parser_busy and not in_head  # this read began inside a body
        # Body progress: what reached the client, or a filter (which may hold it for now).
        body_before = exchange.bytes_out + exchange.response_body_in
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self.exchange is not exchange or not exchange.tunnel:
                self.close()  # a 101 the exchange refused (nobody asked to upgrade)
                return
            self.tunnel = True
            rest = data[upgrade.args[0] :]
            if rest:
                exchange.tunnel_to_client(rest)
            return
        except httptools.HttpParserError:
            if self.exchange is not None:
                self.exchange.upstream_protocol_error(self)
            self.close()
            return
        if self.exchange is not exchange or not self.parser_busy:
            return
        if self.in_head:
            # Measured on every read: httptools keeps an unfinished header line and copies it
            # again as it grows. The read in which the head began is not counted.
            if in_head:
                self.head_read += len(data)
                if self.head_read > MAX_RESPONSE_HEAD + HEAD_SLACK:
                    self.refuse(exchange)
        elif not in_body or exchange.bytes_out + exchange.response_body_in != body_before:
            self.framing_bytes = 0
        else:
            self.framing_bytes += len(data)
            if self.framing_bytes > MAX_CHUNK_FRAMING:
                self.refuse(exchange)

    def refuse(self, exchange: Exchange) -> None:
        """The upstream broke the limits of a response: 502 (or a cut response), and no reuse."""
        exchange.upstream_protocol_error(self)
        self.close()

    def plain_head(self, data: bytes) -> int:
        exchange = self.exchange
        if exchange is None:
            self.close()  # a response nobody asked for: the upstream is broken
            return len(data)
        head = heads.read_response(data, MAX_RESPONSE_HEAD)
        if head is None:
            return -1
        status, headers, keep_alive, length, end = head
        exchange.on_response_head(status, headers, keep_alive)
        if length and not self.head_only:
            self.body_left = length
        else:
            self.on_message_complete()
        return end

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_paused(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_write_paused(False)

    # -- llhttp callbacks (reached only for the responses that read_plain leaves to llhttp) -----
    def on_message_begin(self) -> None:
        if self.exchange is None:
            # A response nobody asked for, here after the one that ended in this read (bytes past
            # its length): the connection goes, so no later request reads them as its answer.
            raise ValueError("unsolicited response")
        self.parser_busy = True
        self.in_head = True
        self.head_bytes = self.head_read = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_RESPONSE_HEAD:
            raise ValueError("response head too large")  # llhttp reports it as a parser error
        if self.in_head:
            self.headers.append((name.lower(), value))
        # else: trailer fields, which are not forwarded and must not join the next response's head

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.framing_bytes = self.head_bytes = 0
        status = self.parser.get_status_code()
        headers = self.headers
        self.headers = []
        if 100 <= status < 200 and status != 101:
            self.interim = True  # 1xx interim answers are consumed here, not forwarded
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.on_response_head(status, headers, self.parser.should_keep_alive())
            if self.head_only and self.exchange is exchange:
                self.reset_parser = True
                exchange.on_response_end()

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.on_response_body(body)

    def on_message_complete(self) -> None:
        self.parser_busy = False
        if self.interim:
            self.interim = False
            return
        exchange = self.exchange
        # llhttp completes a 101 before it reports the upgrade; the tunnel starts then.
        if exchange is not None and exchange.response_status != 101:
            exchange.on_response_end()

    # -- used by the exchange -------------------------------------------------------------------
    def open(self) -> bool:
        """Still connected: not closed, and not being closed (connection_lost may come later)."""
        transport = self.transport
        return not self.closed and transport is not None and not transport.is_closing()

    def send(self, data: bytes) -> None:
        try:
            self.transport.write(data)  # type: ignore[union-attr]
        except RuntimeError:
            # The transport closed under us (the peer reset it, connection_lost is still to
            # come): the exchange hears of a lost connection, as it would a turn later.
            if not self.lost:
                self.closed = True
                self.pool.loop.call_soon(self.connection_lost, None)

    def pause_reading(self, paused: bool) -> None:
        if self.transport is not None and not self.closed:
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()
        self.closed = True


class ConnectionPool:
    """Idle keep-alive connections to one target, most recently used first, with a cap on open ones."""

    __slots__ = (
        "_waiters",
        "host",
        "idle",
        "idle_timeout",
        "loop",
        "max_connections",
        "open_count",
        "port",
        "scheme",
        "ssl",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        scheme: str,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        max_connections: int,
        idle_timeout: float,
    ) -> None:
        self.loop = loop
        self.scheme = scheme
        self.host = host
        self.port = port
        self.ssl = tls
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.idle: list[UpstreamConnection] = []
        self.open_count = 0
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:  # (one being closed fails its send, which is then a lost connection)
                return conn
        return None

    async def connect(self, timeout: float) -> UpstreamConnection:
        """A new connection, waiting for a free slot when the target is at its limit."""
        deadline = self.loop.time() + timeout
        while self.open_count >= self.max_connections:
            waiter: asyncio.Future[UpstreamConnection | None] = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                handed = await asyncio.wait_for(waiter, max(0.0, deadline - self.loop.time()))
            except TimeoutError:
                raise PoolTimeout(f"no free connection to {self.host}:{self.port}") from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if handed is not None and not handed.closed:
                return handed
        self.open_count += 1
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: UpstreamConnection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                ),
                max(0.001, deadline - self.loop.time()),
            )
        except BaseException:
            self.open_count -= 1
            self._wake(None)
            raise
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        conn.exchange = None
        conn.head_only = False
        if conn.closed:
            return
        if self._waiters:
            self._wake(conn)
            return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed: free its slot."""
        self.open_count -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        self._wake(None)

    def _wake(self, conn: UpstreamConnection | None) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn is not None:
            conn.idle_since = self.loop.time()
            self.idle.append(conn)

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than the idle timeout (oldest are at the bottom)."""
        limit = now - self.idle_timeout
        while self.idle and self.idle[0].idle_since < limit:
            self.idle.pop(0).close()

    def close_idle(self) -> None:
        while self.idle:
            self.idle.pop().close()


class PoolManager:
    """One pool per (scheme, host, port), kept across reloads so warm connections survive."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pools: dict[tuple[str, str, int], ConnectionPool] = {}

    def pool_for(
        self, scheme: str, host: str, port: int, tls: ssl.SSLContext | None, config: Any
    ) -> ConnectionPool:
        key = (scheme, host, port)
        pool = self.pools.get(key)
        if pool is None:
            pool = ConnectionPool(
                self.loop, scheme, host, port, tls, config.max_connections, config.idle_timeout
            )
            self.pools[key] = pool
        else:
            pool.max_connections = config.max_connections
            pool.idle_timeout = config.idle_timeout
        return pool

    def sweep(self, now: float) -> None:
        for pool in self.pools.values():
            pool.sweep(now)

    def close_idle(self) -> None:
        for pool in self.pools.values():
            pool.close_idle()
