"""The `concurrency-limit` policy: at most ``max`` requests in flight, a short queue, then 503.

Where a rate limit counts requests per window, this counts the requests being served right
now, so a slow upstream gets backpressure (a bounded queue, then quick 503s) instead of an
ever-growing pile of open requests. A request that finds a free slot takes it and goes on with
no wait and no task; one that finds none waits in a FIFO queue of at most ``queue`` requests
for up to ``queue_timeout``, and is answered 503 if no slot frees up in time, or at once when
the queue is full. Its slot is released when the exchange ends, however it ends.

``per`` picks what shares one count: the route (default), the upstream group the route sends
to (every route to that group with the same ``max`` and ``queue``; configure it once under the
global ``policies:`` for one count per upstream), or the consumer on this route (the client IP
for requests without one). Counts live in each worker process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from apigate.config.units import Duration
from apigate.engine.replies import Reply, json_reply
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.concurrency_limit.slots import slots_for
from apigate.policies.registry import register

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange


class ConcurrencyLimitConfig(PolicyConfig):
    max: int = Field(ge=1, le=1_000_000, description="requests in flight at once")
    queue: int = Field(default=0, ge=0, le=1_000_000, description="requests that may wait for a slot")
    queue_timeout: Duration = Field(default=1.0, gt=0, le=3600, description="longest wait in the queue")
    per: Literal["route", "upstream", "consumer"] = Field(
        default="route",
        description="route: one count per route; upstream: shared by the routes to one upstream "
        "group; consumer: per consumer on this route (the client IP without one)",
    )
    retry_after: int = Field(default=1, ge=0, le=86400, description="seconds, sent in Retry-After")


@register
class ConcurrencyLimit(Policy[ConcurrencyLimitConfig]):
    name = "concurrency-limit"
    order = 2100  # after authentication (per consumer) and rate limits (a refused request takes no slot)
    phases = frozenset({"request", "log"})

    def prepare(self) -> None:
        config = self.config
        self.slots = slots_for(config.per, config.max, config.queue)
        self.key_of: Callable[[Exchange], str] = {
            "route": self._route_key,
            "upstream": self._upstream_key,
            "consumer": self._consumer_key,
        }[config.per]
        self.retry_after = [(b"retry-after", b"%d" % config.retry_after)]
        self.engine_hooks = {"log": self.slots.end}

    def on_request(self, exchange: Exchange) -> Reply | Awaitable[Reply | None] | None:
        key = self.key_of(exchange)
        slots = self.slots
        if slots.take(exchange, key):
            return None
        turn = slots.join_queue(exchange, key)
        if turn is None:
            return self._refuse(exchange, "too many requests in flight")
        return self._wait(exchange, turn)

    def on_log(self, exchange: Exchange) -> None:
        self.slots.end(exchange)

    async def _wait(self, exchange: Exchange, turn: asyncio.Future[bool]) -> Reply | None:
        await asyncio.wait((turn,), timeout=self.config.queue_timeout)
        if turn.done():  # a slot was handed over (True), or the exchange ended while waiting
            return None if turn.result() else self._refuse(exchange, "the request ended while queued")
        self.slots.leave_queue(exchange)
        return self._refuse(exchange, "no slot freed up in time; too many requests in flight")

    def _refuse(self, exchange: Exchange, message: str) -> Reply:
        exchange.vars()["limited"] = "concurrency_limited"  # for the access log
        payload = {"error": message, "reason": "concurrency_limited", "request_id": exchange.request_id}
        return json_reply(503, payload, self.retry_after)

    # -- what shares a count ---------------------------------------------------------------------
    def _route_key(self, exchange: Exchange) -> str:
        return self.route

    def _upstream_key(self, exchange: Exchange) -> str:
        route: Any = exchange.route
        group = route.upstream if route is not None else None
        # A route without an upstream (a terminal policy answers it) counts alone; the space
        # keeps its key apart from every upstream name.
        return group.name if group is not None else "route " + self.route

    def _consumer_key(self, exchange: Exchange) -> str:
        consumer: Any = exchange.consumer
        who = "consumer " + str(consumer.id) if consumer is not None else "ip " + exchange.client_ip
        return self.route + "\x1f" + who

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["counters"] = "this process"
        return described
