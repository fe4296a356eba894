"""Spans of sampled exchanges and webhook deliveries, exported over OTLP/HTTP (``tracing.export``).

A sampled exchange becomes a SERVER span, whose id is the one named to the client in
``traceresponse`` and whose parent is the client's span when it sent a traceparent, and, when
an upstream was called, a CLIENT span, whose id is the parent-id the upstream got in its
``traceparent`` (one per exchange: its attempts share it) and whose parent is the SERVER span.
Both are built after the exchange finished from its monotonic times, moved to the epoch by one
offset taken when the observer is made. Attributes follow the OpenTelemetry HTTP semantic
conventions; the query string is never recorded (it may carry an API key).

The hook is called for sampled exchanges only (the engine reads the flag: ``SampledHook``); it
costs a few dicts and a queue append: the spans go to an exporting process of the worker's
(spanprocess.py), which encodes and sends them (otlp.py). A delivery attempt of a webhook is a
span too (webhooks/tracing.py says whose trace it joins).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from apigate.engine.tracing import TraceIds
from apigate.observe.base import SampledHook
from apigate.observe.spanprocess import AttributeValue, SpanProcess
from apigate.webhooks.tracing import AttemptTrace, attempt_trace

if TYPE_CHECKING:
    from apigate.config.models import GatewayConfig
    from apigate.config.tracing import ExportConfig
    from apigate.engine.exchange import Exchange
    from apigate.services import Services
    from apigate.store.roles.webhooks import DeliveryClaim
    from apigate.webhooks.destinations.base import Result

log = logging.getLogger("apigate.tracing")

STOP_TIMEOUT: Final = 5.0  # longest wait, while the worker stops, for queued spans to be sent
COUNT_NAMES: Final = ("trace_spans_exported", "trace_spans_failed", "trace_spans_dropped")
# Methods the HTTP semantic conventions name; any other is "_OTHER" (and kept as the original).
KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


class SpanExport:
    """The Observer of span export; also the webhook worker's ``DeliverySpans``."""

    def __init__(
        self, monotonic: Callable[[], float] = time.monotonic, wall_ns: Callable[[], int] = time.time_ns
    ) -> None:
        self.offset_ns = wall_ns() - int(monotonic() * 1e9)
        self.settings: ExportConfig | None = None
        self.pipeline: SpanProcess | None = None
        self.pipelines: list[SpanProcess] = []  # every one made, for counts that never go back
        self.delivery_ids = TraceIds()  # span ids and sampling of webhook delivery attempts

    # -- the Observer --------------------------------------------------------------------------------
    def apply(self, config: GatewayConfig) -> SampledHook | None:
        tracing = config.tracing
        self.delivery_ids.ratio = tracing.sample_ratio
        if tracing.export != self.settings:
            old = self.pipeline
            self.pipeline = SpanProcess(tracing.export) if tracing.export is not None else None
            if self.pipeline is not None:
                self.pipelines.append(self.pipeline)
            self.settings = tracing.export
            if old is not None:  # its queued spans go out, waited for by a thread of its own
                closing = functools.partial(old.close, old.settings.timeout + STOP_TIMEOUT)
                threading.Thread(target=closing, name="apigate-spans-close", daemon=True).start()
        return None if self.pipeline is None else SampledHook(self.export_exchange)

    async def start(self, config: GatewayConfig, services: Services) -> None:
        services.trace_deliveries(self)

    async def stop(self) -> None:
        pipeline = self.pipeline
        if pipeline is None:
            return
        self.pipeline = None
        if not await _closed_within(pipeline, STOP_TIMEOUT):
            log.warning("trace export: the collector did not take the last spans within %.0fs", STOP_TIMEOUT)

    def counts(self) -> dict[str, int]:
        if not self.pipelines:
            return {}
        totals = [sum(counted) for counted in zip(*(p.counts() for p in self.pipelines), strict=True)]
        return dict(zip(COUNT_NAMES, totals, strict=True))

    # -- exchanges -----------------------------------------------------------------------------------
    def export_exchange(self, exchange: Exchange) -> None:
        pipeline = self.pipeline
        if pipeline is None:
            return
        method = exchange.method if exchange.method in KNOWN_METHODS else "_OTHER"
        status = exchange.response_status
        route = exchange.route
        failure = _failure(exchange)
        times = (self._epoch_ns(exchange.t_start), self._epoch_ns(exchange.t_end))
        server: dict[str, AttributeValue] = {
            "http.request.method": method,
            "url.scheme": exchange.forwarded_proto.decode("latin-1"),
            "url.path": exchange.path,
            "client.address": exchange.client_ip,
            "network.protocol.version": exchange.version,
            "apigate.request_id": exchange.request_id,
        }
        if method == "_OTHER":
            server["http.request.method_original"] = exchange.method
        if status:
            server["http.response.status_code"] = status
        if route is not None:
            server["http.route"] = route.path
            server["apigate.route"] = route.name
        error = (failure or str(status)) if status >= 500 else None
        if error is not None:
            server["error.type"] = error
        name = f"{method} {route.path}" if route is not None else method
        ids = (exchange.trace_id, exchange.span_id, exchange.parent_span_id)
        pipeline.emit(name, "server", ids, True, times, server, error)
        target = exchange.target
        if exchange.upstream_span_id and target is not None:
            client: dict[str, AttributeValue] = {
                "http.request.method": method,
                "server.address": target.host,
                "server.port": target.port,
            }
            if exchange.attempt > 1:
                client["http.request.resend_count"] = exchange.attempt - 1
            if exchange.tried:
                client["apigate.upstream.tried"] = list(exchange.tried)
            # The upstream answered the last attempt, unless that attempt failed before a response.
            answered = exchange.t_first_byte >= exchange.t_attempt and exchange.t_first_byte > 0.0
            if answered:
                client["http.response.status_code"] = status
                error = str(status) if status >= 400 else None
            else:
                error = failure
            if error is not None:
                client["error.type"] = error
            ids = (exchange.trace_id, exchange.upstream_span_id, exchange.span_id)
            pipeline.emit(method, "client", ids, False, times, client, error)

    def _epoch_ns(self, monotonic: float) -> int:
        return self.offset_ns + int(monotonic * 1e9)

    # -- webhook deliveries (webhooks/tracing.py's DeliverySpans) -------------------------------------
    def begin(self, claim: DeliveryClaim) -> AttemptTrace | None:
        if self.pipeline is None:
            return None
        return attempt_trace(claim.headers, self.delivery_ids)

    def end(
        self, trace: AttemptTrace, claim: DeliveryClaim, result: Result, started: float, ended: float
    ) -> None:
        pipeline = self.pipeline
        if pipeline is None or not trace.sampled:
            return
        attributes: dict[str, AttributeValue] = {
            "apigate.webhook.source": claim.source,
            "apigate.webhook.destination": claim.destination,
            "apigate.webhook.event_id": claim.event_id,
            "apigate.webhook.attempt": claim.attempt,
        }
        if claim.event_type is not None:
            attributes["apigate.webhook.event_type"] = claim.event_type
        if result.status is not None:
            attributes["http.response.status_code"] = result.status
        error = None
        if not result.delivered:
            attributes["error.type"] = str(result.status) if result.status is not None else "not_delivered"
            error = result.error or "not delivered"
        ids = (trace.trace_id, trace.span_id, trace.parent_span_id)
        times = (int(started * 1e9), int(ended * 1e9))
        pipeline.emit(f"deliver {claim.destination}", "client", ids, True, times, attributes, error)


def _failure(exchange: Exchange) -> str | None:
    """Why the gateway ended the exchange itself (connect_failed, total_timeout, client_closed...),
    else why the last upstream attempt gave no response that was passed on."""
    if exchange.failure is not None:
        return exchange.failure
    tried = exchange.tried
    if tried and exchange.t_first_byte < exchange.t_attempt:
        return tried[-1].rpartition(" ")[2]
    return None


async def _closed_within(pipeline: SpanProcess, timeout: float) -> bool:
    """Close ``pipeline`` in a thread of its own, its exporting process killed after ``timeout``."""
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[bool] = loop.create_future()

    def close() -> None:
        ended = False
        try:
            ended = pipeline.close(timeout)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(_settle, closed, ended)

    threading.Thread(target=close, name="apigate-spans-close", daemon=True).start()
    try:
        return await asyncio.wait_for(closed, timeout + 2.0)
    except TimeoutError:
        return False


def _settle(future: asyncio.Future[bool], ended: bool) -> None:
    if not future.done():
        future.set_result(ended)
