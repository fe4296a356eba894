"""The client side: one asyncio Protocol per accepted connection, parsing with llhttp (httptools),
or, for plain heads in the compiled build, with engine/heads.py.

Pipelined requests are parsed as they arrive but answered strictly in order: the first
exchange in ``queue`` is active, later ones wait (their bodies buffered, reading paused).
Flow control is a set of pause reasons so that independent causes never resume each other.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import httptools

from apigate.engine import heads, wire
from apigate.engine.exchange import Exchange
from apigate.engine.paths import PathRefused, normalize_path

if TYPE_CHECKING:
    from apigate.engine.server import Gateway


# Plain heads are read by the compiled reader; llhttp reads the rest (and all when uncompiled).
READ_HEADS: Final = heads.COMPILED


class HeadersTooLarge(Exception):
    pass


class ClientConnection(wire.HeadReader):
    PAUSE_BODY = 1  # request body waiting for an upstream connection
    PAUSE_PIPELINE = 2  # a pipelined request waits behind the active one
    PAUSE_UPSTREAM = 4  # the upstream socket is not taking more request body

    __slots__ = (
        "closed",
        "draining",
        "gateway",
        "head_since",
        "header_bytes",
        "headers",
        "out",
        "parser",
        "parsing",
        "peer_ip",
        "peer_ip_bytes",
        "peer_trusted",
        "queue",
        "quiet_since",
        "read_pauses",
        "request_ids",
        "seen",
        "transport",
        "tunnel",
        "url",
        "write_paused",
    )

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gateway = gateway
        self.request_ids = gateway.request_ids  # kept here: a compiled attribute is cheaper to reach
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.parsing: Exchange | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.read_pauses = 0
        self.write_paused = False
        self.out: list[bytes] | None = None
        self.closed = False
        self.draining = gateway.draining
        self.tunnel: Exchange | None = None
        self.peer_ip = ""
        self.peer_ip_bytes = b""
        self.peer_trusted = False
        self.seen = True
        self.quiet_since = 0.0
        self.head_since = 0.0  # when the sweep first found a head being received

    # -- transport events ------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        self.peer_ip_bytes = self.peer_ip.encode()
        self.peer_trusted = self.gateway.is_trusted(self.peer_ip)
        self.gateway.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gateway.connections.discard(self)
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.abort()
        while self.queue:
            exchange = self.queue.popleft()
            if not exchange.finished:
                exchange.abort()

    def data_received(self, data: bytes) -> None:
        self.seen = True
        if self.tunnel is not None:
            self.tunnel.tunnel_to_upstream(data)
            return
        if READ_HEADS and not self.parser_busy:
            data = self.read_plain(data)
            if not data:
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # llhttp has completed the upgrade request already, so it is the newest in line.
            exchange = self.queue[-1] if self.queue else None
            rest = data[upgrade.args[0] :]
            if exchange is not None:
                self.parsing = None
                exchange.request_done = True
                self.tunnel = exchange
                if rest:
                    exchange.tunnel_to_upstream(rest)
                # Nothing is parsed on this connection after an upgrade request.
                self.set_read_paused(self.PAUSE_PIPELINE, True)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, HeadersTooLarge):
                self.refuse(431, "request headers are too large")
            else:
                self.refuse(400, "malformed HTTP request")

    def eof_received(self) -> bool:
        # A half-closed client may still wait for its answers; keep the socket open for them.
        return bool(self.queue)

    def pause_writing(self) -> None:
        self.write_paused = True
        exchange = self.tunnel or (self.queue[0] if self.queue else None)
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.pause_reading(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        exchange = self.tunnel or (self.queue[0] if self.queue else None)
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.pause_reading(False)

    def plain_head(self, data: bytes) -> int:
        if self.closed or self.tunnel is not None:
            return -1
        head = heads.read_request(data, self.gateway.max_header_bytes)
        if head is None:
            return -1
        method, target, headers, version, keep_alive, length, end = head
        self.head_complete(method, target, headers, version, keep_alive, False, False)
        if length:
            self.body_left = length
        else:
            self.on_message_complete()
        return end

    # -- llhttp callbacks (reached only for the heads that read_plain leaves to llhttp) -----------
    def on_message_begin(self) -> None:
        self.parser_busy = True

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)
        if self.header_bytes > self.gateway.max_header_bytes:
            raise HeadersTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.gateway.max_header_bytes:
            raise HeadersTooLarge
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        raw_method = parser.get_method()
        method = wire.METHODS.get(raw_method)
        url, headers = self.url, self.headers
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        self.head_complete(
            method or raw_method.decode("latin-1"),
            url,
            headers,
            parser.get_http_version(),
            parser.should_keep_alive(),
            parser.should_upgrade(),
            method is None,
        )

    def head_complete(
        self,
        method: str,
        url: bytes,
        headers: list[tuple[bytes, bytes]],
        version: str,
        keep_alive: bool,
        upgrade: bool,
        unknown_method: bool,
    ) -> None:
        """A request head is read: queue its exchange, and start it if it is first in line."""
        problem = "unsupported request target or method"
        try:
            path, raw_path, query = split_target(url, self.gateway.unescape_slashes)
        except PathRefused as exc:
            path, raw_path, query, problem = None, b"", b"", str(exc)
        exchange = Exchange(self, method, path or "/", raw_path, query, headers, version, keep_alive, upgrade)
        self.parsing = exchange
        self.queue.append(exchange)
        if unknown_method or path is None:
            exchange.close_after = True
            # Kept on the exchange: a pipelined one is answered when its turn comes (_next).
            status = 400 if path is None else 501
            exchange.refusal = (status, problem)
            if len(self.queue) == 1:
                exchange.fail(status, problem)
            return
        if len(self.queue) == 1:
            exchange.begin()
        else:
            self.set_read_paused(self.PAUSE_PIPELINE, True)

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        if exchange is not None and not exchange.finished:
            exchange.on_request_body(body)

    def on_message_complete(self) -> None:
        self.parser_busy = False
        exchange = self.parsing
        self.parsing = None
        if exchange is not None:
            exchange.on_request_end()
            if (
                exchange.finished
                and exchange.close_after is False
                and self.queue
                and self.queue[0] is exchange
            ):
                self._next()

    # -- used by exchanges ----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        out = self.out
        if out is not None:
            out.append(data)
        elif not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def cork(self) -> None:
        """Collect writes until uncork(): a response head and body then leave in one send()."""
        if self.out is None:
            self.out = []

    def uncork(self) -> None:
        out = self.out
        if out is not None:
            self.out = None
            if out and not self.closed:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))  # type: ignore[union-attr]

    def set_read_paused(self, reason: int, paused: bool) -> None:
        before = self.read_pauses
        after = before | reason if paused else before & ~reason
        self.read_pauses = after
        if self.closed or self.transport is None:
            return
        if before == 0 and after != 0:
            self.transport.pause_reading()
        elif before != 0 and after == 0:
            self.transport.resume_reading()

    def start_tunnel(self, exchange: Exchange) -> None:
        self.tunnel = exchange
        self.set_read_paused(self.PAUSE_PIPELINE, False)

    def exchange_finished(self, exchange: Exchange) -> None:
        if exchange is self.tunnel:
            self.tunnel = None
            self.close()
            return
        if exchange.close_after or (self.draining and len(self.queue) <= 1):
            self.close()
            return
        if exchange is self.parsing:
            return  # its request body is still arriving; _next runs when it is complete
        if self.queue and self.queue[0] is exchange:
            self._next()

    def _next(self) -> None:
        queue = self.queue
        queue.popleft()
        if len(queue) <= 1 and self.read_pauses & self.PAUSE_PIPELINE:
            self.set_read_paused(self.PAUSE_PIPELINE, False)
        if queue:
            head = queue[0]
            if head.refusal is None:
                head.begin()
            else:
                head.fail(head.refusal[0], head.refusal[1])

    def refuse(self, status: int, message: str) -> None:
        """A request that cannot be parsed: answer once and close, as nothing after it can be trusted."""
        if self.closed:
            return
        active = self.queue[0] if self.queue else None
        if active is not None and active is self.parsing and not active.finished:
            # The request being answered is the broken one (a bad chunk in its body, say).
            self.parsing = None
            active.close_after = True
            active.fail(status, message)
            return
        if active is not None and not active.finished:
            # Earlier requests still get their answers; the bad one ends the connection after them.
            self.parser = httptools.HttpRequestParser(self)
            self.parser_busy = False
            self.url, self.headers, self.header_bytes = b"", [], 0
            self.set_read_paused(self.PAUSE_PIPELINE, True)
            active.close_after = True
            return
        self.gateway.stats.count_error(status)
        request_id = self.gateway.next_request_id()
        body = wire.error_body(message, request_id.decode())
        self.write(
            wire.status_line(status)
            + b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
            + b"x-request-id: %s\r\nconnection: close\r\n\r\n" % request_id
            + body
        )
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.uncork()
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def check_idle(self, now: float, keepalive: float, header_timeout: float) -> None:
        """Close a connection that has had no request for ``keepalive`` seconds, or that has been
        sending one head for ``header_timeout`` seconds (the sweep calls this while no request is
        in flight). A head trickled a byte at a time keeps ``seen`` set, so it is timed from the
        first sweep that finds it started, as a whole."""
        if self.parser_busy:
            if not self.head_since:
                self.head_since = now
            elif now - self.head_since > header_timeout:
                self.refuse(408, "the request head did not arrive in time")
            return
        self.head_since = 0.0
        if self.seen or not self.quiet_since:
            self.seen = False
            self.quiet_since = now
        elif now - self.quiet_since > keepalive:
            self.close()

    def idle(self) -> bool:
        return not self.queue and self.tunnel is None


def split_target(url: bytes, unescape_slashes: bool = False) -> tuple[str | None, bytes, bytes]:
    """Path (as text and as bytes) and query of a request target; None for a target not accepted.

    The path comes back in its normal form (engine/paths.py), the form that is both routed and
    sent upstream, so that ``/public/../admin`` or ``/%61dmin`` cannot reach a route that
    ``/admin`` would not; a path with no normal form raises PathRefused.
    """
    if url[:1] != b"/":
        if url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
            parsed = httptools.parse_url(url)
            url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
        else:
            return None, b"", b""
    path, _, query = url.partition(b"?")
    text = path.decode("latin-1")
    normal = normalize_path(text, unescape_slashes)
    if normal is not text:
        path = normal.encode("latin-1")
    return normal, path, query
