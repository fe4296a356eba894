"""Request events, live: each worker turns finished exchanges into small events and sends them to
the node in batches; the node streams them to /api/events listeners and, when configured, adds
them to a Redis stream (node/events.py).

The hook is installed only while the node says someone wants events (a listener, or a Redis
stream), so a gateway nobody watches pays nothing per request. While installed it samples
(``events.sample``, an exact share without a random draw) and caps what each worker sends per
second (``events.max_per_second``); events over the cap are counted, not queued. An event holds
no credential: the path without its query, and ids, never headers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from apigate.observe.base import FinishHook

if TYPE_CHECKING:
    from apigate.config.models import GatewayConfig
    from apigate.engine.exchange import Exchange
    from apigate.services import Services

SEND_EVERY: Final = 0.2  # seconds a batch waits for more events before it goes to the node
EVENT_TYPE: Final = "gateway.request.completed"

Send = Callable[[list[dict[str, Any]]], None]


class EventFeed:
    """The ``Observer`` (observe/base.py) of request events in one worker."""

    def __init__(self, send: Send | None = None) -> None:
        self.send = send  # to the node (the process sets it once the link exists)
        self.wanted = False  # the node's word: someone listens, or a Redis stream takes them
        self.enabled = False
        self.sample = 1.0
        self.max_per_second = 0
        self.credit = 0.0
        self.second = 0
        self.in_second = 0
        self.capped = 0
        self.pending: list[dict[str, Any]] = []
        self._flush: asyncio.TimerHandle | None = None

    def apply(self, config: GatewayConfig) -> FinishHook | None:
        settings = config.events
        self.enabled = settings.enabled
        self.sample = settings.sample
        self.max_per_second = settings.max_per_second
        return self.record if self.enabled and self.wanted else None

    def record(self, exchange: Exchange) -> None:
        """The finish hook: sample, cap, and queue the exchange's event."""
        self.credit += self.sample
        if self.credit < 1.0:
            return
        self.credit -= 1.0
        second = int(time.monotonic())
        if second != self.second:
            self.second, self.in_second = second, 0
        if self.in_second >= self.max_per_second:
            self.capped += 1
            return
        self.in_second += 1
        self.pending.append(event_of(exchange))
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(SEND_EVERY, self.flush)

    def flush(self) -> None:
        self._flush = None
        batch, self.pending = self.pending, []
        if batch and self.send is not None:
            self.send(batch)

    def counts(self) -> dict[str, int]:
        return {"events_capped": self.capped}

    async def start(self, config: GatewayConfig, services: Services) -> None:
        return None

    async def stop(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
        self.flush()


def event_of(exchange: Exchange) -> dict[str, Any]:
    """A request's event: what happened, with no credential (no query, no header)."""
    route = exchange.route
    target = exchange.target
    end = exchange.t_end or exchange.t_start
    status = exchange.response_status
    return {
        "type": EVENT_TYPE,
        "time": time.time() - (time.monotonic() - end),
        "request_id": exchange.request_id,
        "trace_id": exchange.trace_id.decode(),
        "method": exchange.method,
        "path": exchange.path,
        "route": route.name if route is not None else None,
        "status": status,
        "latency_ms": round((end - exchange.t_start) * 1000, 3),
        "client_ip": exchange.client_ip,
        "consumer": exchange.consumer_id(),
        "upstream": target.address if target is not None else None,
        "bytes_in": exchange.bytes_in,
        "bytes_out": exchange.bytes_out,
        "error": status >= 500 or status == 0,
    }
