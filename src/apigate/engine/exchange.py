"""One request and its response, from the client's head to the last byte back.

An Exchange is what policies see: method, path, headers, client IP, route, params, and a
``state`` dict for policies to talk to each other. It also drives the proxying: it picks a
target, borrows a pooled upstream connection, streams the body both ways with backpressure,
retries when that is safe, and turns failures into JSON errors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final

from apigate.engine import framing, wire
from apigate.engine.breakers import CLOSED
from apigate.engine.replies import Reply, error_body
from apigate.engine.retries import CONNECT, RESET, TIMEOUT
from apigate.engine.router import MethodNotAllowed
from apigate.engine.tracing import TraceIds, parse_traceparent
from apigate.engine.upstream import PoolTimeout, UpstreamConnection
from apigate.engine.wire import (
    FIELD_CONNECTION,
    FIELD_CONTENT_LENGTH,
    FIELD_EXPECT,
    FIELD_HOST,
    FIELD_TRACEPARENT,
    FIELD_TRANSFER_ENCODING,
    FIELD_X_FORWARDED_FOR,
    FIELD_X_FORWARDED_PROTO,
    FIELD_X_REQUEST_ID,
    PROXY_READ_FIELDS,
)
from apigate.httpspec import IDEMPOTENT_METHODS

if TYPE_CHECKING:
    from apigate.engine.client import ClientConnection
    from apigate.engine.plan import CompiledRoute, LogHook, Plan, Target, UpstreamGroup

log = logging.getLogger("apigate")
# A Final is a C static when compiled: each clock read skips a lookup in the module's globals.
_monotonic: Final = time.monotonic

# What a client's Connection header cannot take away: the engine reads these for Host and
# framing (RFC 9112 §6), and the Upgrade handshake needs its Upgrade field.
_NOT_NOMINATED: Final = frozenset({b"host", b"content-length", b"transfer-encoding", b"upgrade"})
_NO_PARAMS: Final[dict[str, str]] = {}
_NO_HEADERS: Final[list[tuple[bytes, bytes]]] = []
# A body this small is kept so the request can be replayed on another connection.
REPLAY_LIMIT = 64 * 1024
# An early answer keeps the connection if the unread request body is at most this big.
DISCARD_LIMIT = 64 * 1024
# Pending request body above this pauses reading from the client until the upstream takes it.
BODY_HIGH_WATER = 256 * 1024


class CompiledRequestHook:
    """A request hook compiled with the engine (a policy's hotpath class): the engine calls its
    ``run`` as a native method, where calling a Python callable costs ~100 instructions more. It
    stays callable, as any request hook."""

    def run(self, exchange: Exchange) -> Any:
        raise NotImplementedError

    def __call__(self, exchange: Exchange) -> Any:
        return self.run(exchange)


class Exchange:
    # Defaults live on the class: a request sets only what it uses, which keeps creating an
    # Exchange cheap (it happens once per request on the hot path).
    state: dict[str, Any] | None = None
    consumer: Any = None
    tenant: str | None = None
    # consumer_id()'s answer and the consumer it is for: rate limits, metrics and the access log
    # each ask, and the id is read from the consumer once.
    named_consumer: Any = None
    consumer_name: str | None = None
    route: CompiledRoute | None = None
    params: dict[str, str]
    remainder: str | None = None
    prefix: str | None = None
    # The upstream path a request policy chose (the transform policy's path rewrite), in normal
    # form; it replaces what the route's rewrite or strip_prefix would send.
    rewritten_path: str | None = None
    target: Target | None = None
    upstream: UpstreamConnection | None = None
    attempt = 0
    t_attempt = 0.0  # when the current attempt picked its target (monotonic)
    sent_at = 0.0  # when the sweep first saw the current attempt sent (0.0: not yet)
    tried: list[str] | None = None  # each failed attempt, for the exchange's log line (retries only)
    reused = False
    body_pending: list[bytes] | None = None
    body_pending_size = 0
    body_replay: list[bytes] | None = None
    replayable = True
    body: bytes | None = None  # the whole request body, once a body hook made the engine buffer it
    # Set by a request hook whose body hook must read this body whole (an XML body to convert):
    # over the route's body limit it gets 413, even where oversized bodies stream on unread.
    body_must_fit = False
    buffering = False
    bytes_in = 0
    bytes_out = 0
    request_done = False
    response_started = False
    response_status = 0
    response_headers: list[tuple[bytes, bytes]]
    # Header lines (b"name: value\r\n"...) a request-phase policy adds to whatever response this
    # request gets (rate-limit fields): written after the fields, once the response policies ran,
    # which neither see nor edit them. Cheaper than fields in ``response_headers`` when every
    # response carries them.
    response_lines = b""
    response_chunked = False
    response_until_eof = False
    # The response body's filters (the route's response_body phase), in the order the body meets
    # them; None, the class default, while the body goes to the client as it arrives.
    body_filters: list[Any] | None = None
    response_body_in = 0  # response body bytes read from the upstream while filters ran
    # What a response hook answered instead of an upstream response without a body (a 304, a
    # HEAD's): sent once that response has ended and its connection is back in the pool.
    replacement: Reply | None = None
    response_replaced = False  # a response hook replaced this exchange's response (once at most)
    # Set by a response_body hook whose filter reads the whole body before it writes (a JSON
    # mapping): the head then waits for the filters' first output (``head_held``), and goes with
    # the body's exact Content-Length when they held it all to the end.
    hold_head = False
    head_held = False
    upstream_keep_alive = False
    close_after = False
    finished = False
    tunnel = False
    upgrade_to = b""  # the protocols offered to the upstream, when the route allows an upgrade
    # A head read but not acceptable: answered in begin(), when its turn comes.
    refusal: tuple[int, str, list[tuple[bytes, bytes]]] | None = None
    # Request-body progress as the sweep last saw it (no clock call per chunk).
    body_mark = -1
    body_quiet_since = 0.0
    t_first_byte = 0.0
    t_end = 0.0
    # Why the gateway ended the exchange itself, for its log line: the reason of a failure
    # (connect_failed, first_byte_timeout...), or aborted when a started response was cut.
    failure: str | None = None
    # Read-timeout bookkeeping without a clock call per chunk: upstream data sets ``seen``;
    # the gateway's sweep notes when it last found it set.
    seen = False
    quiet_since = 0.0
    # W3C trace context (engine/tracing.py): 32 and 16 hex digits; the client's span (None: a
    # new trace), the gateway's server span and its span of the upstream call.
    trace_id = b""
    span_base = b""
    span_id = b""
    parent_span_id: bytes | None = None
    upstream_span_id = b""
    sampled = False
    # Where a hook chain waits while a hook's future is pending (see _run_hooks).
    waiting_hooks: tuple[Any, ...] = ()
    waiting_index = 0
    waiting_body_phase = False

    def __init__(
        self,
        client: ClientConnection,
        method: str,
        path: str,
        raw_path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        version: str,
        keep_alive: bool,
        upgrade: bool,
        authority: bytes | None = None,
    ) -> None:
        """``authority``: the host of an absolute-form target, which replaces Host (RFC 9112 §3.2.2)."""
        self.client = client
        self.method = method
        self.path = path
        self.raw_path = raw_path
        self.query = query
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.t_start = _monotonic()
        self.plan: Plan = client.gateway.plan
        self.params = _NO_PARAMS  # shared and never mutated in place: routing replaces it
        self.response_headers = _NO_HEADERS
        # One pass over the headers for what the proxy itself needs (one dict probe per header).
        host = xff = rid = proto = fwd_host = traceparent = None
        content_length: int | None = None
        chunked = expect = False
        hosts = 0
        tokens: set[bytes] | None = None
        for name, value in headers:
            kind = PROXY_READ_FIELDS.get(name)
            if kind is None:
                continue
            if kind == FIELD_HOST:
                host = value
                hosts += 1
            elif kind == FIELD_CONTENT_LENGTH:
                content_length = int(value)  # llhttp already refused malformed and conflicting ones
            elif kind == FIELD_TRANSFER_ENCODING:
                chunked = True
            elif kind == FIELD_X_FORWARDED_FOR:
                xff = value if xff is None else xff + b", " + value
            elif kind == FIELD_X_REQUEST_ID:
                rid = value
            elif kind == FIELD_EXPECT:
                expect = value.lower() == b"100-continue"
            elif kind == FIELD_CONNECTION:
                found = wire.connection_tokens(value)
                if found:
                    tokens = found if tokens is None else tokens | found
            elif kind == FIELD_X_FORWARDED_PROTO:
                proto = value
            elif kind == FIELD_TRACEPARENT:
                traceparent = value
            else:  # FIELD_X_FORWARDED_HOST
                fwd_host = value
        if hosts != 1 or version != "1.1" or authority is not None:
            host = self._check_head(hosts, version, authority, host)
        if tokens:
            self._drop_nominated(tokens)
        self.host = host.decode("latin-1") if host is not None else None
        self.content_length = content_length
        self.request_chunked = chunked
        self.expect_continue = expect and version == "1.1"
        self.xff = xff
        gateway = client.gateway
        if rid is not None and _sane_id(rid):
            self.rid = rid
            self._start_trace(traceparent, False, gateway.trace_ids)
        else:
            self.rid = client.request_ids.next()
            self._start_trace(traceparent, True, gateway.trace_ids)
        trusted = client.peer_trusted
        self.client_ip = (
            gateway.client_ip_from(client.peer_ip, xff, self.plan) if trusted and xff else client.peer_ip
        )
        self.forwarded_proto = proto if trusted and proto else b"http"
        self.forwarded_host = fwd_host if trusted and fwd_host else host

    def _start_trace(self, traceparent: bytes | None, own_id: bool, ids: TraceIds) -> None:
        """The client's trace (a valid traceparent) or a new one, and the gateway's span in it;
        the response will say both (traceresponse)."""
        found = parse_traceparent(traceparent) if traceparent is not None else None
        if found is not None:
            self.trace_id, self.parent_span_id, self.sampled = found
        else:  # a new trace: the request id the gateway made is one (32 hex digits)
            self.trace_id = self.rid if own_id else self.client.request_ids.next()
            self.sampled = ids.sample()
        # The server span ends in 1, the span of the upstream call in 2 (one number formatted).
        base = self.span_base = ids.span_base()
        self.span_id = span = base + b"1"
        flags = b"-01\r\n" if self.sampled else b"-00\r\n"
        self.response_lines = b"traceresponse: 00-" + self.trace_id + b"-" + span + flags

    def _check_head(
        self, hosts: int, version: str, authority: bytes | None, host: bytes | None
    ) -> bytes | None:
        """Note a refusal for a head that RFC 9112 rejects; returns the Host the request goes by."""
        if version not in ("1.0", "1.1"):
            self.refuse_with(505, f"HTTP/{version} is not supported here; send HTTP/1.1")
        elif hosts > 1:
            self.refuse_with(400, "the request has more than one Host header")
        elif hosts == 0 and version == "1.1":
            self.refuse_with(400, "an HTTP/1.1 request needs a Host header")
        if authority is None or self.refusal is not None:
            return host
        # An absolute-form target names the host: it replaces the Host header (RFC 9112 §3.2.2).
        self.headers = [pair for pair in self.headers if pair[0] != b"host"]
        self.headers.append((b"host", authority))
        return authority

    def _drop_nominated(self, tokens: set[bytes]) -> None:
        """Remove the client's own headers that its Connection header names (RFC 9110 §7.6.1), once,
        before any policy runs, so that headers the gateway sets later are never taken away."""
        names = tokens - _NOT_NOMINATED
        if names:
            self.headers = [pair for pair in self.headers if pair[0] not in names]

    # -- what policies use ---------------------------------------------------------------------
    @property
    def request_id(self) -> str:
        return self.rid.decode("latin-1")

    def consumer_id(self) -> str | None:
        """The consumer's id: identity policies set a consumer record (with ``id``) or a name."""
        consumer = self.consumer
        if consumer is self.named_consumer:
            return self.consumer_name
        if consumer is None or isinstance(consumer, str):
            return consumer
        found = getattr(consumer, "id", None)
        self.identify(consumer, found if isinstance(found, str) else None)
        return self.consumer_name

    def identify(self, consumer: Any, consumer_id: str | None) -> None:
        """Set the consumer with its id (what ``consumer_id()`` answers while it stays the consumer)."""
        self.consumer = consumer
        self.named_consumer = consumer
        self.consumer_name = consumer_id

    def header(self, name: bytes) -> bytes | None:
        """First value of a request header; ``name`` in lowercase."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def detached_copy(self, headers: list[tuple[bytes, bytes]], state: dict[str, Any]) -> Exchange | None:
        """Send a copy of this request (a GET or HEAD without a body) to its route's upstream for
        no client, with ``headers`` (lowercase names) and ``state`` as its own: a policy's refresh
        in the background. Its response meets the route's response, response_body and log hooks
        and the plan's finish hooks, then goes nowhere. None when the gateway is draining or the
        request cannot be sent again (a body, no upstream)."""
        return self.client.gateway.send_detached(self, headers, state)

    def vars(self) -> dict[str, Any]:
        """Per-request scratch space shared by policies (allocated on first use)."""
        if self.state is None:
            self.state = {}
        return self.state

    # -- request phase ---------------------------------------------------------------------------
    def refuse_with(
        self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Answer this request with an error when its turn comes, then end the connection."""
        self.close_after = True
        self.refusal = (status, message, headers or [])

    def begin(self) -> None:
        """Route, run request policies, then go upstream. Called when this exchange is first in line."""
        refusal = self.refusal
        if refusal is not None:
            self.fail(*refusal)
            return
        builtin = self.client.gateway.builtins.get(self.path)
        if builtin is not None and self.method in ("GET", "HEAD"):
            answer = builtin(self)
            if isinstance(answer, Reply):
                self.reply(answer)
            else:
                self.client.gateway.spawn(self._reply_later(answer))
            return
        match = self.plan.router.match(self.method, self.path, self.host, self.headers)
        if match is None:
            self.fail(404, "no route matches this request")
            return
        if isinstance(match, MethodNotAllowed):
            self._method_not_allowed(", ".join(match.allowed).encode())
            return
        route: CompiledRoute = match.payload  # type: ignore[assignment]
        if self.method == "TRACE" and not route.lists_methods:
            # TRACE echoes the request, credentials included (RFC 9110 §9.3.8): only where listed.
            self._method_not_allowed(wire.ALLOWED_METHODS)
            return
        self.route = route
        self.params = match.params
        self.remainder = match.remainder
        self.prefix = match.prefix
        if self.upgrade:
            self._choose_upgrade(route)
        limit = route.max_body_size
        if limit is not None and self.content_length is not None and self.content_length > limit:
            self.close_after = True
            self.fail(413, f"request body exceeds the route's limit of {limit} bytes")
            return
        self._run_hooks(route.request_hooks, 0, False)

    def _choose_upgrade(self, route: CompiledRoute) -> None:
        """Offer the upstream only the protocols the route allows (RFC 9110 §7.8); with none left,
        the request is served as plain HTTP, and the connection still ends after it."""
        offered = [
            token.strip()
            for token in (self.header(b"upgrade") or b"").split(b",")
            if token.strip().partition(b"/")[0].lower() in route.upgrades
        ]
        if offered:
            self.upgrade_to = b", ".join(offered)
        else:
            self.upgrade = False

    async def _reply_later(self, pending: Awaitable[Reply]) -> None:
        try:
            answer = await pending
        except Exception:
            self.client.gateway.log_exception("a built-in endpoint failed", self)
            self.fail(500, "the endpoint failed")
            return
        if not self.finished and not self.client.closed:
            self.reply(answer)

    def _method_not_allowed(self, allow: bytes) -> None:
        self.reply(Reply(405, error_body("method not allowed", self.request_id), [(b"allow", allow)]))

    def _run_hooks(self, hooks: tuple[Any, ...], index: int, body_phase: bool) -> None:
        """Run a phase's hooks from ``index``; an early answer ends the exchange, passing moves on.

        Hooks run inline; only one that hands back an awaitable (a key fetch, a Redis round
        trip) makes the rest of the chain wait, so a decision made from memory costs no task and
        no loop iteration. A future is waited for with a callback (a Redis decision settled where
        its reply is read); any other awaitable in a task.
        """
        try:
            while index < len(hooks):
                hook = hooks[index]
                if body_phase:
                    result = hook(self, self.body)
                elif isinstance(hook, CompiledRequestHook):
                    result = hook.run(self)
                else:
                    result = hook(self)
                index += 1
                if result is None:
                    continue
                if isinstance(result, Reply):
                    self.reply(result)
                    return
                if isinstance(result, asyncio.Future):
                    self.waiting_hooks = hooks
                    self.waiting_index = index
                    self.waiting_body_phase = body_phase
                    result.add_done_callback(self._hook_settled)
                    return
                self.client.gateway.spawn(self._finish_hooks_async(result, hooks, index, body_phase))
                return
        except Exception:
            self.client.gateway.log_exception("policy failed", self)
            self.fail(500, "a policy failed while handling this request")
            return
        self._hooks_passed(body_phase)

    def _hook_settled(self, future: asyncio.Future[Reply | None]) -> None:
        hooks = self.waiting_hooks
        self.waiting_hooks = ()
        if self.finished or self.client.closed:
            return
        # Nothing cancels these futures; one that is cancelled ends the exchange as a failure does.
        error = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if error is not None:
            self.client.gateway.log_exception("policy failed", self, error)
            self.fail(500, "a policy failed while handling this request")
            return
        result = future.result()
        if result is None:
            self._run_hooks(hooks, self.waiting_index, self.waiting_body_phase)
            return
        try:
            self.reply(result)
        except Exception:  # as when a hook answers inline (``_run_hooks``)
            self.client.gateway.log_exception("policy failed", self)
            self.fail(500, "a policy failed while handling this request")

    async def _finish_hooks_async(
        self, pending: Awaitable[Reply | None], hooks: tuple[Any, ...], index: int, body_phase: bool
    ) -> None:
        try:
            result: Any = await pending
        except Exception:
            self.client.gateway.log_exception("policy failed", self)
            self.fail(500, "a policy failed while handling this request")
            return
        if self.finished or self.client.closed:
            return
        if result is not None:
            self.reply(result)
        else:
            self._run_hooks(hooks, index, body_phase)

    def _hooks_passed(self, body_phase: bool) -> None:
        route = self.route
        assert route is not None
        if body_phase:
            self._send_buffered_body()
        elif route.body_hooks:
            self._start_buffering(route)
        else:
            self.go_upstream()

    # -- buffered bodies, for policies that read the whole body (signatures, token endpoints) --
    def _start_buffering(self, route: CompiledRoute) -> None:
        limit = route.body_limit
        if (self.content_length or 0) > limit or self.bytes_in > limit:
            if route.oversized_body_streams and not self.body_must_fit:
                self.go_upstream()  # the body hooks are skipped: the body goes on as it comes
                return
            self.close_after = True
            self.fail(413, f"request body exceeds the limit of {limit} bytes")
            return
        self.buffering = True
        if self.request_done:
            self._body_complete()
            return
        client = self.client
        if self.expect_continue:
            self.expect_continue = False
            client.write(wire.CONTINUE_100)
        client.resume(client.PAUSE_BODY)

    def _body_complete(self) -> None:
        self.buffering = False
        pieces = self.body_pending
        self.body = b"".join(pieces) if pieces else b""
        self.body_pending = None
        self.body_pending_size = 0
        route = self.route
        assert route is not None
        self._run_hooks(route.body_hooks, 0, True)

    def _send_buffered_body(self) -> None:
        # The whole body is in memory, so any attempt can resend it, whatever its size.
        body = self.body or b""
        self.request_chunked = False
        self.body_pending = [body] if body else None
        self.body_replay = self.body_pending
        self.replayable = True
        self.go_upstream()

    def go_upstream(self) -> None:
        if self.expect_continue and not self.request_done:
            self.expect_continue = False  # the 100 is owed once
            self.client.write(wire.CONTINUE_100)
        route = self.route
        assert route is not None
        group = route.upstream
        if group is None:
            self.fail(500, "this route has no upstream and no policy answered the request")
            return
        first = self.target is None  # (a free retry after a stale connection is not a first attempt)
        now = self.t_start if first else _monotonic()
        target = group.single
        if target is None:
            target = self._pick(group, now)
            if target is None:
                return
        previous = self.target
        if previous is not None:
            previous.state.in_flight -= 1
        target.state.in_flight += 1
        self.target = target
        if first and group.budget is not None:
            group.budget.request()
        self.attempt += 1
        self.t_attempt = now
        conn = target.pool.take_idle()
        if conn is not None:
            self.attach(conn, reused=True)
        else:
            # The route's timeout bounds the whole exchange: connecting included (no sweep watches it).
            left = route.timeout - (now - self.t_start)
            self.client.gateway.spawn(self._connect(target, min(group.timeouts.connect, left)))

    def _pick(self, group: UpstreamGroup, now: float) -> Target | None:
        """The balancer's choice, or None after answering 503 (circuit open, no usable target)."""
        breaker = group.breaker
        if breaker is not None and not breaker.admit(now):
            self._unavailable(group, now, "circuit_open", f"the circuit of upstream {group.name} is open")
            return None
        target = group.pick(self, self.target if self.attempt else None, now)
        if target is None:
            if breaker is not None:
                breaker.cancel_probe()  # no request went: a half-open circuit's probe is not spent
            targets = group.targets
            if targets and all(
                t.state.breaker is not None and t.state.breaker.state != CLOSED for t in targets
            ):
                self._unavailable(
                    group, now, "circuit_open", f"every circuit of upstream {group.name} is open"
                )
            else:
                self._unavailable(
                    group, now, "no_healthy_upstream", f"no target of upstream {group.name} is available"
                )
            return None
        target.state.admit(now)
        return target

    def _unavailable(self, group: UpstreamGroup, now: float, reason: str, message: str) -> None:
        """503 at once with Retry-After: nothing queues for targets that are down."""
        if self.tried is not None:
            self._log_attempts(f"503 {reason}")
        retry_after = str(group.retry_after(now)).encode()
        self.fail(503, message, [(b"retry-after", retry_after)], reason)

    async def _connect(self, target: Target, timeout: float) -> None:
        try:
            conn = await target.pool.connect(timeout)
        except (PoolTimeout, TimeoutError):
            self.attempt_failed(CONNECT, 504, "upstream connect timed out", "connect_timeout")
            return
        except OSError:
            self.attempt_failed(
                CONNECT, 502, "upstream refused the connection or could not be resolved", "connect_failed"
            )
            return
        if self.finished or self.client.closed:
            target.pool.release(conn)
            return
        if not conn.open():
            # It closed between opening and this turn (the target died): nothing was sent.
            self.attempt_failed(CONNECT, 502, "upstream closed the connection as it opened", "connect_failed")
            return
        self.attach(conn, reused=False)

    def attempt_failed(self, kind: int, status: int, message: str, reason: str, sent: bool = False) -> None:
        """The current attempt failed before a usable response: note it against the target, then
        try again when that is allowed and safe, else answer ``status`` with ``reason``.

        A request that never reached an upstream is always safe to retry; one that was sent is
        retried only when its method is idempotent (RFC 9110 §9.2.2) or it carries the route's
        idempotency-key header. A pooled connection that the upstream had closed while idle fails
        before answering: that is not the target's failure, and it retries at once, for free.
        """
        route = self.route
        target = self.target
        if self.finished or route is None or target is None:
            return
        group = route.upstream
        assert group is not None
        now = _monotonic()
        stale = sent and self.reused and kind == RESET
        if stale:
            self.attempt -= 1
        else:
            self._note_failure(group, target, now, reason)
        delay = self._retry_delay(route, group, bool(kind & route.retry.on), sent, stale, now)
        if delay >= 0.0:
            self._retry(delay)
            return
        if self.tried is not None and self.attempt > 1:
            self._log_attempts(f"{status} {reason}")
        self.fail(status, message, None, reason)

    def _note_failure(self, group: UpstreamGroup, target: Target, now: float, reason: str) -> None:
        if group.monitored:
            group.failed(target, now)
        self._note_attempt(target, reason)

    def _note_attempt(self, target: Target, outcome: str) -> None:
        if self.tried is None:
            self.tried = []
        self.tried.append(f"{target.host}:{target.port} {outcome}")

    def _retry_delay(
        self,
        route: CompiledRoute,
        group: UpstreamGroup,
        retried_kind: bool,
        sent: bool,
        stale: bool,
        now: float,
    ) -> float:
        """Seconds to wait before the next attempt, or -1.0 when there is none: not this kind of
        failure, no attempts left, not safe to resend, no time left, or the budget is spent (asked
        last, as a yes spends from it)."""
        policy = route.retry
        if not (
            retried_kind
            and not self.response_started
            and not self.client.closed
            and self.replayable
            and self.attempt <= policy.attempts
            and (not sent or self._may_resend(policy.idempotency_header))
        ):
            return -1.0
        if stale:
            return 0.0
        delay = policy.backoff(self.attempt)
        # No backoff (base 0) is no exemption: once the route's timeout passed, nothing is retried.
        if delay >= route.timeout - (now - self.t_start):
            return -1.0
        if group.budget is not None and not group.budget.try_retry(now):
            return -1.0
        return delay

    def _retry(self, delay: float) -> None:
        route = self.route
        if route is not None and route.meter is not None:
            route.meter.retries += 1
        if delay > 0.0:
            self.client.gateway.loop.call_later(delay, self._retry_now)
        else:
            self.go_upstream()

    def _retry_now(self) -> None:
        if not self.finished and not self.client.closed:
            self.go_upstream()

    def _may_resend(self, idempotency_header: bytes | None) -> bool:
        if self.method in IDEMPOTENT_METHODS:
            return True
        return idempotency_header is not None and self.header(idempotency_header) is not None

    def _log_attempts(self, outcome: str) -> None:
        tried = ", ".join(self.tried or ())
        log.warning(
            "request %s %s %s: %d attempt(s): %s; %s",
            self.request_id,
            self.method,
            self.path,
            self.attempt,
            tried,
            outcome,
        )

    def attach(self, conn: UpstreamConnection, reused: bool) -> None:
        self.upstream = conn
        conn.exchange = self
        conn.head_only = self.method == "HEAD"
        self.quiet_since = 0.0
        self.sent_at = 0.0
        route = self.route
        assert route is not None
        target = self.target
        assert target is not None
        head = framing.upstream_head(
            method=self.method,
            raw_path=self.raw_path,
            rewritten_path=(
                self.rewritten_path
                if self.rewritten_path is not None or (route.rewrite is None and not route.prefix_strip)
                else route.upstream_path(self.path, self.params, self.remainder, self.prefix)
            ),
            query=self.query,
            client_host=self.host if route.preserve_host else None,
            target_host=target.host_header,
            headers=self.headers,
            body=self.body,
            xff=self.xff,
            peer=self.client.peer_ip_bytes,
            forwarded_proto=self.forwarded_proto,
            forwarded_host=self.forwarded_host,
            rid=self.rid,
            traceparent=self._traceparent(),
            upgrade_to=self.upgrade_to if self.upgrade else None,
            chunked=self.request_chunked,
        )
        self.reused = reused
        # A kept body holds everything that arrived, so every attempt sends it whole (a free retry
        # after a stale pooled connection counts as the first attempt again: ``attempt`` cannot
        # tell it apart); a body too big to keep goes once, as it arrives.
        pieces = self.body_replay if self.replayable else self.body_pending
        if pieces:
            body = b"".join(pieces)
            self.body_pending = None
            self.body_pending_size = 0
            if self.request_chunked:
                body = wire.chunk(body)
            head += body
        if self.request_chunked and self.request_done:
            head += wire.LAST_CHUNK
        conn.send(head)
        client = self.client
        client.resume(client.PAUSE_BODY)

    def _traceparent(self) -> bytes:
        """The upstream's traceparent: its parent is the gateway's span of the upstream call, one
        per exchange (its attempts share it)."""
        span = self.upstream_span_id
        if not span:
            span = self.upstream_span_id = self.span_base + b"2"
        return b"00-" + self.trace_id + b"-" + span + (b"-01" if self.sampled else b"-00")

    # -- request body from the client ---------------------------------------------------------------
    def on_request_body(self, data: bytes) -> None:
        self.bytes_in += len(data)
        route = self.route
        if route is not None and route.max_body_size is not None and self.bytes_in > route.max_body_size:
            self.close_after = True
            self.fail(413, f"request body exceeds the route's limit of {route.max_body_size} bytes")
            return
        if self.replayable:
            if self.bytes_in > REPLAY_LIMIT:
                self.replayable = False
                self.body_replay = None
            elif self.body_replay is None:
                self.body_replay = [data]
            else:
                self.body_replay.append(data)
        conn = self.upstream
        if conn is not None and not self.finished:
            conn.send(wire.chunk(data) if self.request_chunked else data)
            return
        if self.body_pending is None:
            self.body_pending = [data]
        else:
            self.body_pending.append(data)
        self.body_pending_size += len(data)
        if self.buffering:
            assert route is not None
            if self.bytes_in <= route.body_limit:
                return
            if route.oversized_body_streams and not self.body_must_fit:
                # Too large for the body hooks, which let it pass: what arrived goes upstream
                # first, then the rest as it comes, with backpressure as on any streamed body.
                self.buffering = False
                if self.body_pending_size > BODY_HIGH_WATER:
                    self.client.pause(self.client.PAUSE_BODY)
                self.go_upstream()
                return
            self.close_after = True
            self.fail(413, f"request body exceeds the limit of {route.body_limit} bytes")
        elif self.body_pending_size > BODY_HIGH_WATER:
            self.client.pause(self.client.PAUSE_BODY)

    def on_request_end(self) -> None:
        self.request_done = True
        if self.buffering and not self.finished:
            self._body_complete()
            return
        conn = self.upstream
        if conn is not None and self.request_chunked and not self.finished and not self.upgrade:
            conn.send(wire.LAST_CHUNK)

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self.client.pause(self.client.PAUSE_UPSTREAM)
        else:
            self.client.resume(self.client.PAUSE_UPSTREAM)

    # -- response from the upstream -------------------------------------------------------------------
    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.t_first_byte = now = _monotonic()
        target = self.target
        if target is not None and target.meter is not None:
            target.meter.observe(now - self.t_attempt, now)
        route = self.route
        if (
            route is not None
            and (group := route.upstream) is not None
            and (group.monitored or self.tried is not None or route.retry.statuses)
            and self._judge_response(group, status, now)
        ):
            return  # retried: this response is dropped
        self.response_status = status
        self.upstream_keep_alive = keep_alive
        client = self.client
        kept, length_known, chunked = framing.response_fields(headers, self.rid)
        self.response_headers = kept
        if route is not None and route.response_hooks:
            if route.response_replaces:
                found = self._run_response_hooks(route.response_hooks)
                if found is not None and status != 101:
                    self._replace_response(found, status)
                    return
            else:
                for hook in route.response_hooks:
                    hook(self)
            kept = self.response_headers
        if status == 101:
            if not self.upgrade:  # a switch nobody asked for: nothing may flow unread
                self.upstream_protocol_error(self.upstream)
                return
            self.response_started = True
            client.write(framing.switch_head(kept, self.upgrade_to))
            # A tunnel lives as long as it is used: no total deadline, only the read (idle) timeout.
            self.tunnel = True
            client.start_tunnel(self)
            return
        filtered = False
        upstream_eof = False
        if route is not None and route.response_body_hooks and self._response_has_body(status):
            try:
                self.body_filters = self._collect_filters(route.response_body_hooks)
            except Exception:
                self.client.gateway.log_exception("policy failed", self)
                self.fail(500, "a policy failed while handling the response")
                return
            if self.body_filters is not None:
                # The client's framing follows the filtered body: its own Content-Length if the
                # policies kept one, else chunks (or the close, for HTTP/1.0); the upstream's
                # framing still says where the upstream's body ends.
                filtered = True
                upstream_eof = not length_known and not chunked
                kept = self.response_headers
                length_known = framing.has_length(kept)
                chunked = not length_known
        self.response_started = True
        if self.upgrade:  # the upstream declined the upgrade: answer, then close (close_after)
            self.upstream_keep_alive = False  # the upstream may wait for the other protocol
        if filtered and self.hold_head:
            # Nothing goes yet: the filters may still edit the head (``_release_head``).
            self.head_held = True
            self.response_until_eof = upstream_eof
            return
        until_eof = self._write_head(status, kept, length_known, chunked)
        self.response_until_eof = upstream_eof if filtered else until_eof

    def _write_head(
        self, status: int, headers: list[tuple[bytes, bytes]], length_known: bool, chunked: bool
    ) -> bool:
        """Write the response head; the body then follows its framing. Whether the upstream's body
        ends with its close (read until EOF)."""
        client = self.client
        head, rechunk, until_eof, close = framing.response_head(
            status=status,
            headers=headers,
            length_known=length_known,
            chunked=chunked,
            method=self.method,
            version=self.version,
            keep_alive=self.keep_alive,
            upgrade=self.upgrade,
            closing=self.close_after or client.draining,
            lines=self.response_lines,
        )
        self.response_chunked = rechunk
        if close:
            self.close_after = True
        client.write(head)
        return until_eof

    def _run_response_hooks(self, hooks: tuple[Any, ...]) -> Reply | None:
        """The response hooks of a route where one may replace the response: the first Reply one
        returns stops the chain (the replacement meets every hook in turn), once per exchange."""
        for hook in hooks:
            found: Reply | None = hook(self)
            if found is not None and not self.response_replaced:
                self.response_replaced = True
                return found
        return None

    def _replace_response(self, reply: Reply, status: int) -> None:
        """A response hook answered instead of the upstream. A response without a body ends in this
        same read: its connection goes back to the pool, then ``reply`` goes (on_response_end). The
        rest of a body is not read: that connection goes, and ``reply`` at once."""
        if not self._response_has_body(status):
            self.replacement = reply
            return
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.exchange = None
            conn.close()
        self.reply(reply)

    def _judge_response(self, group: UpstreamGroup, status: int, now: float) -> bool:
        """Note the response against its target; True when a retryable status is retried instead."""
        target = self.target
        assert target is not None
        route = self.route
        assert route is not None
        failed = status < 600 and group.fails[status]
        if failed:
            self._note_failure(group, target, now, str(status))
        elif group.monitored:
            group.succeeded(target, now, now - self.t_attempt)
        retry_statuses = route.retry.statuses
        if retry_statuses and status in retry_statuses:
            delay = self._retry_delay(route, group, True, True, False, now)
            if delay >= 0.0:
                if not failed:
                    self._note_attempt(target, str(status))
                conn = self.upstream
                self.upstream = None
                if conn is not None:  # the rest of this response is not read: the connection goes
                    conn.exchange = None
                    conn.close()
                self._retry(delay)
                return True
        if self.tried is not None and self.attempt > 1:
            self._log_attempts(f"{status} from {target.host}:{target.port}")
        return False

    def on_response_body(self, data: bytes) -> None:
        filters = self.body_filters
        if filters is not None:
            self._filter_body(filters, data)
            return
        self.bytes_out += len(data)
        self.client.write(wire.chunk(data) if self.response_chunked else data)

    def _response_has_body(self, status: int) -> bool:
        """Whether a response with ``status`` to this request carries a body (RFC 9110 §6.4.1)."""
        return status >= 200 and status != 204 and status != 304 and self.method != "HEAD"

    def _collect_filters(self, hooks: tuple[Any, ...]) -> list[Any] | None:
        """The filters the response_body hooks hand back for this response (None: none did)."""
        filters: list[Any] | None = None
        for hook in hooks:
            found = hook(self)
            if found is not None:
                if filters is None:
                    filters = [found]
                else:
                    filters.append(found)
        return filters

    def _filter_body(self, filters: list[Any], data: bytes) -> None:
        self.response_body_in += len(data)
        try:
            for body_filter in filters:
                data = body_filter.feed(data)
                if not data:
                    return  # held (an empty chunk would end a chunked body)
        except Exception:
            self._filter_failed()
            return
        self._send_body(data)

    def _send_body(self, data: bytes) -> None:
        if self.head_held:
            self._release_head(None)
        self.bytes_out += len(data)
        self.client.write(wire.chunk(data) if self.response_chunked else data)

    def _end_filters(self, filters: list[Any]) -> bool:
        """The body is complete: send what the filters still hold. False when one failed (the
        response is cut)."""
        self.body_filters = None
        try:
            rest = finish_filters(filters, b"")
        except Exception:
            self._filter_failed()
            return False
        if self.head_held:
            self._release_head(rest)
        if rest:
            self._send_body(rest)
        return True

    def _filter_failed(self) -> None:
        """A filter raised while the body streamed: its head went, so the response is cut (a
        held head had not: the client gets a 502 instead)."""
        self.body_filters = None
        self.client.gateway.log_exception("a response body filter failed", self)
        if self.head_held:
            self.head_held = False
            self.response_started = False
            self.fail(502, "the upstream's response could not be filtered", None, "response_filter_failed")
            return
        self.abort()

    def _release_head(self, whole: bytes | None) -> None:
        """Write the head the filters held: with ``whole``, the entire filtered body (they held it
        to the end), it goes with that body's exact Content-Length; with None (their output began
        while the body still streamed), its framing follows the head they left, as when the head
        is not held."""
        self.head_held = False
        headers = self.response_headers
        if whole is not None:
            headers = [pair for pair in headers if pair[0] != b"content-length"]
            headers.append((b"content-length", b"%d" % len(whole)))
            self.response_headers = headers
        length_known = framing.has_length(headers)
        self._write_head(self.response_status, headers, length_known, not length_known)

    def _filter_reply(self, hooks: tuple[Any, ...], content_type: bytes, body: bytes) -> tuple[bytes, bytes]:
        """A gateway-made body through the response_body hooks, whole: they see its Content-Type and
        Content-Length among the headers, as they would an upstream's. On a failure the answer goes
        as it was (it may itself be the answer to a failure)."""
        before = self.response_headers
        self.response_headers = [
            (b"content-type", content_type),
            (b"content-length", b"%d" % len(body)),
            *before,
        ]
        try:
            filters = self._collect_filters(hooks)
            filtered = finish_filters(filters, body) if filters is not None else body
        except Exception:
            self.client.gateway.log_exception("policy failed", self)
            self.response_headers = before
            return content_type, body
        kept: list[tuple[bytes, bytes]] = []
        found_type: bytes | None = None
        for pair in self.response_headers:
            name = pair[0]
            if name == b"content-type":
                if found_type is None:
                    found_type = pair[1]
            elif name != b"content-length":  # the answer's own, from the filtered body
                kept.append(pair)
        self.response_headers = kept
        return (found_type if found_type is not None else content_type), filtered

    def on_response_end(self) -> None:
        if self.finished:
            return
        filters = self.body_filters
        if filters is not None and not self._end_filters(filters):
            return
        if self.response_chunked:
            self.client.write(wire.LAST_CHUNK)
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            if (
                self.upstream_keep_alive
                and self.request_done
                and not self.response_until_eof
                and not self.upgrade
            ):
                conn.pool.release(conn)
            else:
                conn.exchange = None
                conn.close()
        replacement = self.replacement
        if replacement is not None:
            self.replacement = None
            self.reply(replacement)
            return
        self.finish()

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        if self.upstream is not conn or self.finished:
            return
        self.upstream = None
        if self.response_started:
            if self.response_until_eof:
                self.on_response_end()
            else:
                self.abort()
            return
        self.attempt_failed(
            RESET, 502, "upstream closed the connection before answering", "upstream_reset", True
        )

    def upstream_protocol_error(self, conn: UpstreamConnection | None) -> None:
        self.upstream = None
        if conn is not None:
            conn.exchange = None
            conn.close()
        if self.response_started:
            self.abort()
            return
        route = self.route
        target = self.target
        if route is not None and route.upstream is not None and target is not None:
            self._note_failure(route.upstream, target, _monotonic(), "invalid_response")
        self.fail(502, "upstream sent an invalid HTTP response", None, "invalid_response")

    def check_timeouts(self, now: float, tunnel_idle: float) -> None:
        """Called by the gateway's sweep while an upstream is attached: the route's total time, the
        try's time, the first byte of the response, then silences between bytes (no clock call
        per chunk: upstream data sets ``seen``; the sweep notes when it last found it set)."""
        route = self.route
        assert route is not None
        if self.tunnel:  # a tunnel lives as long as it is used: only the idle timeout
            self._check_idle(now, tunnel_idle)
            return
        if now - self.t_start > route.timeout:
            self.timed_out(now, "total_timeout", "upstream timed out: the route's timeout passed")
            return
        group = route.upstream
        assert group is not None
        if self.seen or self.quiet_since:
            self._check_idle(now, group.timeouts.idle)
            return
        if not self.sent_at:
            self.sent_at = now  # within one sweep of the send: the timeouts' resolution
            return
        waited = now - self.sent_at
        per_try = route.retry.per_try_timeout
        if per_try and waited > per_try:
            self.attempt_failed(
                TIMEOUT,
                504,
                "upstream timed out: no answer within the try's timeout",
                "per_try_timeout",
                True,
            )
        elif waited > group.timeouts.first_byte:
            self.attempt_failed(
                TIMEOUT, 504, "upstream timed out before its response began", "first_byte_timeout", True
            )

    def _check_idle(self, now: float, idle: float) -> None:
        if self.seen or not self.quiet_since:
            self.seen = False
            self.quiet_since = now
        elif now - self.quiet_since > idle:
            self.timed_out(now, "idle_timeout", "upstream timed out: silent in the middle of its answer")

    def check_body_timeouts(self, now: float, body_idle: float) -> None:
        """Called by the gateway's sweep while the request body is still arriving. Silence longer
        than ``body_idle``, or the route's whole timeout passing, ends it with 408: a route that
        buffers bodies has no upstream yet whose timeouts would end a trickled body. Silence the
        gateway causes (reading paused while the upstream does not take the body, or while a
        connection is awaited) is not the client's: the upstream's timeouts judge that."""
        client = self.client
        if self.expect_continue or client.paused_for(client.PAUSE_BODY | client.PAUSE_UPSTREAM):
            self.body_quiet_since = now  # the client waits for us (100 Continue, or a paused read)
            return
        if client.body_read != self.body_mark:
            self.body_mark = client.body_read
            self.body_quiet_since = now
            idle = False
        else:
            idle = now - self.body_quiet_since > body_idle
        route = self.route
        if idle or (route is not None and now - self.t_start > route.timeout):
            client.gateway.meters.timeouts += 1
            if self.finished:  # answered early; its body was being read to keep the connection
                client.close()
            else:
                self.close_after = True
                self.fail(408, "the request body did not arrive in time")

    def timed_out(self, now: float, reason: str, message: str) -> None:
        self.client.gateway.meters.timeouts += 1
        if self.response_started:
            self.failure = reason
            self.abort()
        else:
            self.fail(504, message, None, reason)

    # -- websocket and other upgrades ----------------------------------------------------------------
    def tunnel_to_client(self, data: bytes) -> None:
        self.seen = True
        self.client.write(data)

    def tunnel_to_upstream(self, data: bytes) -> None:
        conn = self.upstream
        if conn is not None:
            self.seen = True
            conn.send(data)

    # -- endings ---------------------------------------------------------------------------------------
    def reply(self, reply: Reply) -> None:
        """Send a response the gateway made itself."""
        if self.finished:
            return
        status = self.response_status = reply.status
        self.response_headers = [*reply.headers, (b"x-request-id", self.rid)]
        content_type = reply.content_type
        body = reply.body
        route = self.route
        if route is not None:
            if route.meter is not None and (status == 429 or status == 401 or status == 403):
                route.meter.refused(status, reply.reason)
            if route.response_replaces and not self.response_replaced:
                found = self._run_response_hooks(route.response_hooks)
                if found is not None:
                    self.reply(found)  # the hooks see the replacement in turn
                    return
            else:
                for hook in route.response_hooks:
                    hook(self)
            if route.response_body_hooks and body and self._response_has_body(status):
                content_type, body = self._filter_reply(route.response_body_hooks, content_type, body)
        if not self.request_done and (
            self.request_chunked
            or (self.content_length or 0) > DISCARD_LIMIT
            or self.upgrade
            or self.expect_continue
        ):
            # A small unread body is read and dropped to keep the connection; a large or
            # unbounded one would cost more than a new connection. A client still waiting for
            # 100 Continue may never send its body (RFC 9110 §10.1.1): what it sends next could
            # be read as that body, so the connection ends.
            self.close_after = True
        closing = self.close_after or not self.keep_alive or self.client.draining
        message = framing.reply_message(
            status=reply.status,
            content_type=content_type,
            body=body,
            headers=self.response_headers,
            method=self.method,
            closing=closing,
            lines=self.response_lines,
        )
        self.close_after = closing
        self.response_started = True
        self.bytes_out += 0 if self.method == "HEAD" else len(body)
        self.client.write(message)
        self.finish()

    def fail(
        self,
        status: int,
        message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        reason: str | None = None,
    ) -> None:
        """Answer with a JSON error if nothing was sent yet; otherwise cut the connection."""
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.exchange = None
            conn.close()
        if reason is not None:
            self.failure = reason
        if self.response_started:
            self.abort()
            return
        self.client.gateway.meters.count_error(status, reason)
        self.reply(Reply(status, error_body(message, self.request_id, reason), headers))

    def abort(self) -> None:
        """The response cannot be completed: close both sides so the client sees a truncated reply."""
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.exchange = None
            conn.close()
        self.close_after = True
        if not self.finished and self.failure is None:
            self.failure = "client_closed" if self.client.closed else "aborted"
        self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.t_end = now = _monotonic()
        meters = self.client.meters
        meters.requests_total += 1
        route = self.route
        meter = route.meter if route is not None else self.plan.unrouted
        if meter is not None:
            meter.observe(
                self.method, self.response_status, now - self.t_start, self.bytes_in, self.bytes_out, now
            )
            meters.count_client(self.client_ip, self.consumer_id(), now)
        target = self.target
        if target is not None:
            target.state.in_flight -= 1
        if route is not None and route.log_hooks:
            self._run_log_hooks(route.log_hooks, "log hook failed")
        plan = self.plan
        self._run_log_hooks(plan.finish_hooks, "finish hook failed")
        if self.sampled and plan.sampled_hooks:
            self._run_log_hooks(plan.sampled_hooks, "finish hook failed")
        self.client.exchange_finished(self)

    def _run_log_hooks(self, hooks: tuple[LogHook, ...], failed: str) -> None:
        for hook in hooks:
            try:
                hook(self)
            except Exception:
                self.client.gateway.log_exception(failed, self)


def finish_filters(filters: list[Any], data: bytes) -> bytes:
    """The end of a body: ``data`` (its last piece, or b"") through ``filters`` in order, each
    ended in turn, what it still held going through the filters after it; returns what remains."""
    for body_filter in filters:
        fed: bytes = body_filter.feed(data) if data else b""
        held: bytes = body_filter.end()
        data = fed + held if fed else held
    return data


def _sane_id(value: bytes) -> bool:
    """Propagate a client's request id only if it is short printable ASCII without a quote or a
    backslash: it ends up in logs, and the access log writes request ids into JSON unescaped."""
    return 0 < len(value) <= 200 and all(33 <= b < 127 and b != 34 and b != 92 for b in value)
