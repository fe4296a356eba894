"""The ``webhook-ingest`` policy: the terminal policy of the routes compiled from ``webhooks.sources``.

It sees the exact raw body (the engine buffers it for ``on_body``), verifies it with the source's
scheme, then either commits the event and answers 2xx once it is durable (async mode) or forwards
it and answers with the handler's reply (sync mode). Bad input is a 4xx naming the reason code;
nothing here answers 5xx for what a sender did.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, ClassVar

from apigate.engine.replies import Reply
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.registry import register
from apigate.webhooks.requests import refuse, verdict_reply, webhook_request

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange


class WebhookIngestConfig(PolicyConfig):
    source: str


@register
class WebhookIngest(Policy):
    name = "webhook-ingest"
    order = 9000  # after every other request policy (rate limits, IP rules) on the route
    Config = WebhookIngestConfig
    config: WebhookIngestConfig
    needs = frozenset({"webhooks"})
    terminal = True
    body_limit: ClassVar[int] = 64 << 20  # the source's max_body_size (the route's limit) decides

    def on_body(self, exchange: Exchange, body: bytes) -> Reply | Awaitable[Reply | None] | None:
        runtime = self.services.webhooks if self.services is not None else None
        source = runtime.sources.get(self.config.source) if runtime is not None else None
        if runtime is None or source is None:
            # Between a reload that adds a source and the runtime taking it: moments, so retry soon.
            return refuse(
                exchange, 503, "unavailable", "webhook intake is starting", [(b"retry-after", b"1")]
            )
        verdict = source.verifier.verify(webhook_request(exchange, body, runtime.clock()))
        refusal = verdict_reply(exchange, verdict)
        if refusal is not None:
            return refusal
        if exchange.method != "POST":
            return refuse(exchange, 405, "method_not_allowed", "webhooks are POSTed", [(b"allow", b"POST")])
        if source.config.mode == "sync":
            return runtime.forward(source, verdict.event_id, exchange.headers, body)
        return runtime.accept(
            source, verdict.event_id, verdict.event_type, exchange.headers, body, exchange.request_id
        )
