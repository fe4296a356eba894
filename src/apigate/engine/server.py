"""The gateway in one process: the listener, the current plan, pools, counters and timers.

``apply`` swaps ``plan`` (one reference); exchanges keep the plan they started with. The gateway
compiles nothing and starts no service: the process builds the plan and wires the services.
Timeouts are checked by one periodic sweep instead of a timer per request, which keeps the
hot path free of timer handles; their resolution is ``SWEEP_INTERVAL``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from apigate.engine import builtin, wire
from apigate.engine.breakers import TargetStates
from apigate.engine.client import ClientConnection, DetachedTransport
from apigate.engine.exchange import Exchange
from apigate.engine.metrics import Meters
from apigate.engine.plan import Plan
from apigate.engine.replies import Reply
from apigate.engine.router import Router
from apigate.engine.tracing import TraceIds
from apigate.engine.upstream import PoolManager
from apigate.httpspec import address_in, peer_address

log = logging.getLogger("apigate")

SWEEP_INTERVAL = 0.1
SLOW_SWEEP_EVERY = 10  # pools and idle clients are checked once a second


class Gateway:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """A gateway serving an empty plan (every request 404) until ``apply`` gives it one."""
        self.loop = loop or asyncio.get_running_loop()
        self.pools = PoolManager(self.loop)
        self.target_states = TargetStates()  # health and circuits of upstream targets, across reloads
        # What the process last learned of the store and state backends ("store": {"status": ...}),
        # for /health/detailed: the engine knows neither, the process checks them.
        self.dependencies: dict[str, dict[str, object]] = {}
        self.meters = Meters()  # this worker's counts, across reloads
        self.connections: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.draining = False
        self.ready = True  # false from SIGTERM on (/health/detailed), through the drain notice
        self.server: asyncio.AbstractServer | None = None
        self.request_ids = wire.RequestIds()
        self.trace_ids = TraceIds()
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweeps = 0
        self.builtins: dict[str, Callable[[Exchange], Reply | Awaitable[Reply]]] = {}
        # The node's merged views (stats, metrics, prometheus): status, content type and body.
        # The process links it; the engine only passes the answer on.
        self.node_view: Callable[[str], Awaitable[tuple[int, bytes, bytes]]] | None = None
        self.plan = Plan(router=Router(()), routes=())
        self.max_header_bytes = self.plan.max_header_bytes
        self.unescape_slashes = self.plan.unescape_slashes

    # -- configuration ------------------------------------------------------------------------------
    def apply(self, plan: Plan) -> None:
        """Serve ``plan`` from now on; requests already running keep the plan they started with."""
        self.builtins = builtin.endpoints(self, plan)
        self.trace_ids.ratio = plan.trace_sample_ratio
        # Kept here as well: the client protocol reads them on every head.
        self.max_header_bytes = plan.max_header_bytes
        self.unescape_slashes = plan.unescape_slashes
        self.plan = plan

    def is_trusted(self, ip: str) -> bool:
        proxies = self.plan.trusted_proxies
        if not proxies:
            return False
        return address_in(ip, proxies)

    def client_ip_from(self, peer: str, xff: bytes, plan: Plan) -> str:
        """The first address from the right of X-Forwarded-For that is not a trusted proxy."""
        hops = [h.strip() for h in xff.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            try:
                address = peer_address(hop)
            except ValueError:
                return peer  # a forged or broken entry: trust nothing left of it
            if not any(address in network for network in plan.trusted_proxies):
                return hop
        return hops[0] if hops else peer

    def next_request_id(self) -> bytes:
        return self.request_ids.next()

    # -- running ---------------------------------------------------------------------------------
    async def serve(self, sock: socket.socket) -> None:
        self.server = await self.loop.create_server(lambda: ClientConnection(self), sock=sock, backlog=2048)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def send_detached(
        self, exchange: Exchange, headers: list[tuple[bytes, bytes]], state: dict[str, Any]
    ) -> Exchange | None:
        """A copy of ``exchange`` sent upstream for no client (``Exchange.detached_copy``): a
        connection of its own whose writes go nowhere, in ``connections`` so that the sweep times
        it and a drain waits for it, closed when its exchange finishes. The copy gets a request id
        of its own and starts at the upstream: the request hooks that let the original through
        do not run again."""
        route = exchange.route
        if (
            self.draining
            or route is None
            or route.upstream is None
            or exchange.method not in ("GET", "HEAD")
            or exchange.content_length
            or exchange.request_chunked
        ):
            return None
        client = ClientConnection(self)
        client.connection_made(DetachedTransport(client, exchange.client.peer_ip, self.loop))
        own = [pair for pair in headers if pair[0] != b"x-request-id"]  # the copy gets its own
        method, path = exchange.method, exchange.path
        copy = Exchange(client, method, path, exchange.raw_path, exchange.query, own, "1.1", False, False)
        copy.plan = exchange.plan
        copy.route = route
        copy.params = exchange.params
        copy.remainder = exchange.remainder
        copy.prefix = exchange.prefix
        copy.rewritten_path = exchange.rewritten_path
        copy.state = state
        copy.request_done = True
        client.queue.append(copy)
        copy.go_upstream()
        return copy

    def log_exception(
        self, message: str, exchange: Exchange | None = None, error: BaseException | None = None
    ) -> None:
        """Log ``error``, or the exception being handled, with the request it failed."""
        request_id = exchange.request_id if exchange is not None else "-"
        log.error("%s (request %s)", message, request_id, exc_info=error or True)

    def _sweep(self) -> None:
        now = time.monotonic()
        timeouts = self.plan.timeouts
        slow = self._sweeps % SLOW_SWEEP_EVERY == 0
        self._sweeps += 1
        for conn in list(self.connections):
            exchange = conn.tunnel or (conn.queue[0] if conn.queue else None)
            if exchange is not None:
                if not exchange.request_done and not exchange.tunnel:
                    exchange.check_body_timeouts(now, timeouts.body_idle)
                # An exchange just ended above has no upstream left: it is not counted twice.
                if exchange.upstream is not None:
                    exchange.check_timeouts(now, timeouts.read)
            elif slow:
                conn.check_idle(now, timeouts.keepalive, timeouts.header)
        if slow:
            self.pools.sweep(now)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def drain(self, timeout: float, notice: float = 0.0) -> None:
        """Say not ready and keep serving for ``notice`` seconds; then stop accepting, let in-flight
        requests finish (up to ``timeout``), and close everything."""
        self.ready = False
        if notice > 0:
            await asyncio.sleep(notice)
        self.draining = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.draining = True
            if conn.idle():
                conn.close()
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.pools.close_idle()
