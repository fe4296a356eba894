"""The ``webhook-ingest`` policy: the terminal policy of the routes compiled from ``webhooks.sources``.

It sees the exact raw body (the engine buffers it for ``on_body``), verifies it with the source's
scheme, then hands the event to the webhook runtime: committed, and answered 2xx once it is
durable (async mode), or forwarded and answered with the handler's reply (sync mode). The
runtime says what became of the event (``webhooks/outcomes.py``); this policy says it in HTTP.
Bad input is a 4xx naming the reason code; nothing here answers 5xx for what a sender did.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

from apigate.engine.replies import Reply, json_reply
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.registry import register
from apigate.policies.services import unavailable
from apigate.policies.webhook_http import refuse, verdict_reply, webhook_request
from apigate.webhooks.outcomes import Handled, Outcome, Refused, Stored

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange


class WebhookIngestConfig(PolicyConfig):
    source: str


@register
class WebhookIngest(Policy[WebhookIngestConfig]):
    name = "webhook-ingest"
    order = 9000  # after every other request policy (rate limits, IP rules) on the route
    phases = frozenset({"body"})
    needs = frozenset({"webhooks"})
    terminal = True
    body_limit = 64 << 20  # the source's max_body_size (the route's limit) decides

    def on_body(self, exchange: Exchange, body: bytes) -> Reply | Awaitable[Reply | None] | None:
        runtime = self.services.webhooks
        source = runtime.sources.get(self.config.source) if runtime is not None else None
        if runtime is None or source is None:
            # Between a reload that adds a source and the runtime taking it: moments, so retry soon.
            return unavailable(exchange, "webhook intake is starting")
        verdict = source.verifier.verify(webhook_request(exchange, body, runtime.clock()))
        refusal = verdict_reply(exchange, verdict)
        if refusal is not None:
            return refusal
        if exchange.method != "POST":
            return refuse(exchange, 405, "method_not_allowed", "webhooks are POSTed", [(b"allow", b"POST")])
        if source.config.mode == "sync":
            return _answer(exchange, runtime.forward(source, verdict.event_id, exchange.headers, body))
        return _answer(
            exchange, runtime.accept(source, verdict.event_id, verdict.event_type, exchange.headers, body)
        )


async def _answer(exchange: Exchange, pending: Awaitable[Outcome]) -> Reply:
    """The sender's answer to what became of its event."""
    outcome = await pending
    if isinstance(outcome, Stored):
        payload = {"status": outcome.status, "event_id": outcome.event_id, "request_id": exchange.request_id}
        return json_reply(200, payload)
    if isinstance(outcome, Handled):
        return Reply(outcome.status, outcome.body, content_type=outcome.content_type)
    return _refused(exchange, outcome)


def _refused(exchange: Exchange, refused: Refused) -> Reply:
    if refused.reason == "not_stored":
        payload = {"error": "the event could not be stored; send it again", "request_id": exchange.request_id}
        return json_reply(503, payload, [(b"retry-after", b"1")])
    if refused.reason == "unsendable":
        return json_reply(502, {"error": "the webhook could not be forwarded"})
    status = 504 if refused.reason == "timeout" else 502
    return json_reply(status, {"error": f"the webhook handler did not answer ({refused.reason})"})
