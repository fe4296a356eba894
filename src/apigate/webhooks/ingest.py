"""The ``webhook-ingest`` policy: the terminal policy of the routes compiled from ``webhooks.sources``.

It sees the exact raw body (the engine buffers it for ``on_body``), verifies it with the source's
scheme, then either commits the event and answers 2xx once it is durable (async mode) or forwards
it and answers with the handler's reply (sync mode). Bad input is a 4xx naming the reason code;
nothing here answers 5xx for what a sender did.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, ClassVar

from apigate.engine.exchange import Reply, json_reply
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.registry import register
from apigate.webhooks.verify.model import Reason, WebhookRequest

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

# Refusals about the request's form are 400; refusals about who sent it are 401 (403 for a sender
# outside the allowed networks).
MALFORMED = frozenset(
    {
        Reason.MALFORMED_SIGNATURE,
        Reason.MALFORMED_TIMESTAMP,
        Reason.MALFORMED_CREDENTIALS,
        Reason.MALFORMED_BODY,
    }
)


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
            return _refuse(
                exchange, 503, "unavailable", "webhook intake is starting", [(b"retry-after", b"1")]
            )
        verdict = source.verifier.verify(
            WebhookRequest(
                method=exchange.method,
                url=_public_url(exchange),
                headers=_header_map(exchange.headers),
                body=body,
                client_ip=exchange.client_ip,
                now=runtime.clock(),
            )
        )
        if verdict.answer is not None:
            status, answer, content_type = verdict.answer
            return Reply(status, answer, content_type=content_type)
        if not verdict.ok:
            if verdict.reason == Reason.VERIFICATION_ERROR:
                status = 401
            elif verdict.reason == Reason.SENDER_NOT_ALLOWED:
                status = 403
            else:
                status = 400 if verdict.reason in MALFORMED else 401
            return _refuse(
                exchange, status, verdict.reason, verdict.message or "the webhook was not verified"
            )
        if exchange.method != "POST":
            return _refuse(exchange, 405, "method_not_allowed", "webhooks are POSTed", [(b"allow", b"POST")])
        if source.config.mode == "sync":
            return runtime.forward(source, verdict.event_id, exchange.headers, body)
        return runtime.accept(
            source, verdict.event_id, verdict.event_type, exchange.headers, body, exchange.request_id
        )


def _refuse(
    exchange: Exchange,
    status: int,
    reason: str,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Reply:
    return json_reply(
        status, {"error": message, "reason": str(reason), "request_id": exchange.request_id}, headers
    )


def _public_url(exchange: Exchange) -> str:
    """The URL as the sender saw it (scheme and host from trusted proxies' X-Forwarded-* headers)."""
    host = (exchange.forwarded_host or b"").decode("latin-1")
    url = f"{exchange.forwarded_proto.decode('latin-1')}://{host}{exchange.raw_path.decode('latin-1')}"
    return f"{url}?{exchange.query.decode('latin-1')}" if exchange.query else url


def _header_map(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in headers:
        found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return found
