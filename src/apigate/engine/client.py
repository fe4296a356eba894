"""The client side: one asyncio Protocol per accepted connection, parsing with llhttp (httptools),
or, for plain heads in the compiled build, with engine/heads.py.

Pipelined requests are parsed as they arrive but answered strictly in order: the first
exchange in ``queue`` is active, later ones wait (their bodies buffered, reading paused).
Flow control is a set of pause reasons so that independent causes never resume each other.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import httptools

from apigate.engine import heads, wire
from apigate.engine.exchange import Exchange
from apigate.engine.paths import PathRefused, normalize_path
from apigate.engine.replies import error_body

if TYPE_CHECKING:
    from apigate.engine.metrics import Meters
    from apigate.engine.server import Gateway


# Plain heads are read by the compiled reader; llhttp reads the rest (and all when uncompiled).
READ_HEADS: Final = heads.COMPILED
# scheme://authority followed by the path, query or fragment (or nothing); no userinfo.
_ABSOLUTE_FORM: Final = re.compile(rb"(?i)https?://([^/?#@]+)(?=[/?#]|$)")


class HeadersTooLarge(Exception):
    pass


# A chunked body's framing (sizes, extensions, trailers) read without a byte of data; past it: 400.
MAX_CHUNK_FRAMING: Final = 16 * 1024
# Raw bytes of an unfinished head may exceed max_header_bytes by this much (request line, CRLFs).
HEAD_SLACK: Final = 1024


class ClientConnection(wire.HeadReader):
    PAUSE_BODY = 1  # request body waiting for an upstream connection
    PAUSE_PIPELINE = 2  # a pipelined request waits behind the active one
    PAUSE_UPSTREAM = 4  # the upstream socket is not taking more request body
    PAUSE_UPGRADE = 8  # bytes after an upgrade request's head wait for the upstream's 101

    __slots__ = (
        "body_read",
        "closed",
        "draining",
        "framing_bytes",
        "gateway",
        "head_read",
        "head_since",
        "header_bytes",
        "headers",
        "held",
        "in_head",
        "meters",
        "out",
        "parser",
        "parsing",
        "peer_ip",
        "peer_ip_bytes",
        "peer_trusted",
        "queue",
        "quiet_since",
        "read_pauses",
        "refused_after",
        "request_ids",
        "seen",
        "transport",
        "tunnel",
        "url",
    )

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gateway = gateway
        self.request_ids = gateway.request_ids  # kept here: a compiled attribute is cheaper to reach
        self.meters: Meters = gateway.meters  # the same: every finished exchange counts in it
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.parsing: Exchange | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0  # of the head's finished fields, exactly
        self.in_head = False  # llhttp is reading a request head
        self.head_read = 0  # bytes read while a head was unfinished (see data_received)
        self.body_read = 0  # request body bytes read on this connection, answered or not
        self.framing_bytes = 0  # chunked-body framing read since the last body byte
        self.held: bytes | None = None  # what followed an upgrade request's head, until its 101
        self.refused_after: tuple[int, str] | None = None  # a broken head's answer, after the queue's
        self.read_pauses = 0
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
        if self.held is not None:  # reading is paused; this is what was already on its way
            self.held += data
            return
        if READ_HEADS and not self.parser_busy:
            data = self.read_plain(data)
            if not data:
                return
        if not self.parser_busy and not single_spaced_request_line(data):
            self.refuse(400, "the request line must be method, target and version separated by single spaces")
            return
        in_head = self.in_head
        parsing = self.parsing
        body_before = self.body_read
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgrade_head_read(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, HeadersTooLarge):
                self.refuse(431, "request headers are too large")
            elif str(exc) == "Invalid HTTP version":  # llhttp's words for HTTP/1.2, HTTP/3.0...
                self.refuse(505, "this HTTP version is not supported here; send HTTP/1.1")
            else:
                self.refuse(400, "malformed HTTP request")
            return
        if self.in_head:
            # httptools keeps an unfinished header line in memory and copies it again as it grows,
            # so an unfinished head is measured on every read, not only when a field completes.
            # The read in which the head began is not counted (it may hold the previous message);
            # the slack covers the request line and line ends, which the field count leaves out.
            if in_head:
                self.head_read += len(data)
                if self.head_read > self.gateway.max_header_bytes + HEAD_SLACK:
                    self.refuse(431, "request headers are too large")
        elif parsing is not None and parsing is self.parsing and parsing.request_chunked:
            # llhttp skips chunk extensions without a limit: a chunk header that never ends
            # would hold the connection for good.
            if self.body_read != body_before:
                self.framing_bytes = 0
            else:
                self.framing_bytes += len(data)
                if self.framing_bytes > MAX_CHUNK_FRAMING:
                    self.refuse(400, "chunked body framing is too long")

    def upgrade_head_read(self, rest: bytes) -> None:
        """llhttp stops after an upgrade request's head (and after any CONNECT). What follows is
        not HTTP to us and is not the upstream's until it agrees to switch protocols (101), so it
        waits here, unread; without a 101 the connection ends after the answer."""
        if self.closed:
            return
        self.held = rest
        self.pause(self.PAUSE_UPGRADE)

    def eof_received(self) -> bool:
        # A half-closed client may still wait for its answers; keep the socket open for them.
        return bool(self.queue)

    def pause_writing(self) -> None:
        exchange = self.tunnel or (self.queue[0] if self.queue else None)
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.pause_reading(True)

    def resume_writing(self) -> None:
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
        self.in_head = True
        self.header_bytes = self.head_read = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)
        if self.header_bytes > self.gateway.max_header_bytes:
            raise HeadersTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.gateway.max_header_bytes:
            raise HeadersTooLarge
        if self.in_head:
            self.headers.append((name.lower(), value))
        # else: a chunked body's trailer fields. They are not forwarded (the body goes upstream
        # re-chunked without trailers), and must not become headers of the next request.

    def on_headers_complete(self) -> None:
        parser = self.parser
        raw_method = parser.get_method()
        method = wire.METHODS.get(raw_method)
        url, headers = self.url, self.headers
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        self.in_head = False
        self.framing_bytes = 0
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
        problem = "unsupported request target"
        try:
            path, raw_path, query, authority = split_target(url, self.gateway.unescape_slashes)
        except PathRefused as exc:
            path, raw_path, query, authority, problem = None, b"", b"", None, str(exc)
        exchange = Exchange(
            self, method, path or "/", raw_path, query, headers, version, keep_alive, upgrade, authority
        )
        self.parsing = exchange
        self.queue.append(exchange)
        if unknown_method:
            exchange.refuse_with(501, "unsupported request method")
        elif method == "CONNECT":
            # A reverse proxy has no tunnels to open to arbitrary authorities (RFC 9110 §9.3.6).
            exchange.refuse_with(405, "CONNECT is not supported", [(b"allow", wire.ALLOWED_METHODS)])
        elif path is None:
            exchange.refuse_with(400, problem)
        elif upgrade:
            # Whatever happens, the connection ends with this exchange: a tunnel, or an answer
            # after which the bytes that followed the head are never read as HTTP.
            exchange.close_after = True
            if exchange.content_length or exchange.request_chunked:
                # llhttp leaves the body of an upgrade request unread: it could not be framed.
                exchange.refuse_with(400, "an upgrade request must not have a body")
        if len(self.queue) == 1:
            exchange.begin()
        else:
            self.pause(self.PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        self.body_read += len(body)
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

    def pause(self, reason: int) -> None:
        """Stop reading from the client for ``reason`` (one of the PAUSE_ values); reading stays
        stopped until every reason given has been resumed."""
        before = self.read_pauses
        self.read_pauses = before | reason
        if before == 0 and not self.closed and self.transport is not None:
            self.transport.pause_reading()

    def resume(self, reason: int) -> None:
        """``reason`` no longer holds reading back; a no-op if it did not."""
        before = self.read_pauses
        if not before & reason:
            return
        after = before & ~reason
        self.read_pauses = after
        if after == 0 and not self.closed and self.transport is not None:
            self.transport.resume_reading()

    def paused_for(self, reasons: int) -> bool:
        return bool(self.read_pauses & reasons)

    def start_tunnel(self, exchange: Exchange) -> None:
        """The upstream switched protocols: from now on bytes flow both ways unread."""
        self.tunnel = exchange
        held = self.held
        self.held = None
        if held:
            exchange.tunnel_to_upstream(held)
        self.resume(self.PAUSE_UPGRADE)

    def exchange_finished(self, exchange: Exchange) -> None:
        if exchange is self.tunnel:
            self.tunnel = None
            self.close()
            return
        if exchange.close_after or (self.draining and len(self.queue) <= 1):
            refused = self.refused_after
            if refused is not None and exchange is self.queue[-1]:
                self.refused_after = None
                self.answer_refusal(*refused)
            self.close()
            return
        if exchange is self.parsing:
            return  # its request body is still arriving; _next runs when it is complete
        if self.queue and self.queue[0] is exchange:
            self._next()

    def _next(self) -> None:
        queue = self.queue
        queue.popleft()
        if len(queue) <= 1:
            self.resume(self.PAUSE_PIPELINE)
        if queue:
            queue[0].begin()  # begin() answers a refused head with its error

    def refuse(self, status: int, message: str) -> None:
        """A request that cannot be parsed: answer it in its turn and close, as nothing after it
        can be trusted. Requests before it in the pipeline still get their answers."""
        if self.closed:
            return
        active = self.queue[0] if self.queue else None
        broken = self.parsing  # the broken message's exchange, if its head was read
        self.parsing = None
        if broken is not None and not broken.finished:
            if broken is active:
                broken.close_after = True
                broken.fail(status, message)
                return
            broken.refuse_with(status, message)  # a bad chunk in a pipelined body, say
        elif active is None:
            self.answer_refusal(status, message)
            return
        elif active.finished and active is self.queue[-1]:
            # Its answer was sent (early, while its body still arrived): a second answer could be
            # taken for the next request's, so the connection just ends.
            self.close()
            return
        else:
            # The broken head has no exchange: its answer follows the last one in line.
            self.queue[-1].close_after = True
            self.refused_after = (status, message)
        self.parser = httptools.HttpRequestParser(self)
        self.parser_busy = self.in_head = False
        self.url, self.headers, self.header_bytes = b"", [], 0
        self.pause(self.PAUSE_PIPELINE)

    def answer_refusal(self, status: int, message: str) -> None:
        self.gateway.meters.count_error(status, None)
        request_id = self.gateway.next_request_id()
        body = error_body(message, request_id.decode())
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


class DetachedTransport:
    """The transport of a request no client sent (``Gateway.send_detached``): what the exchange
    writes goes nowhere, and closing it ends its connection as a peer's close would."""

    def __init__(self, protocol: ClientConnection, peer: str, loop: asyncio.AbstractEventLoop) -> None:
        self.protocol = protocol
        self.peer = peer
        self.loop = loop
        self.closing = False

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 0) if name == "peername" else default

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)


def single_spaced_request_line(data: bytes) -> bool:
    """False if the request line at the start of ``data`` has more than one space between its
    parts, which llhttp lets through but RFC 9112 §3 does not; True too when the line is not
    whole yet (llhttp reads it as it comes)."""
    if data[:1] in (b"\r", b"\n"):
        data = data.lstrip(b"\r\n")  # empty lines before a request are allowed (RFC 9112 §2.2)
    end = data.find(b"\n")
    if end < 0:
        return True
    parts = data[:end].split(b" ")
    return len(parts) == 3 and all(parts)


def split_target(url: bytes, unescape_slashes: bool = False) -> tuple[str | None, bytes, bytes, bytes | None]:
    """Path (as text and as bytes), query and, for an absolute-form target, authority of a request
    target; the path is None for a target not accepted.

    The path comes back in its normal form (engine/paths.py), the form that is both routed and
    sent upstream, so that ``/public/../admin`` or ``/%61dmin`` cannot reach a route that
    ``/admin`` would not; a path with no normal form raises PathRefused.
    """
    authority: bytes | None = None
    if url[:1] != b"/":
        # An http(s) absolute-form target; an empty host or userinfo, which RFC 9110 §4.2.4 has
        # recipients treat as an error, is not accepted.
        match = _ABSOLUTE_FORM.match(url)
        if match is None or match.group(1)[:1] == b":":
            return None, b"", b"", None
        authority = match.group(1)
        url = url[match.end() :].partition(b"#")[0]
        if url[:1] != b"/":
            url = b"/" + url  # "http://host" or "http://host?q"
    path, _, query = url.partition(b"?")
    text = path.decode("latin-1")
    normal = normalize_path(text, unescape_slashes)
    if normal is not text:
        path = normal.encode("latin-1")
    return normal, path, query, authority
