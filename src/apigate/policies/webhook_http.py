"""A webhook as the HTTP side sees it: the request a verifier checks, and the answer to a refusal.

Shared by the intake of configured sources (``webhook-ingest``) and by the pass-through
verification of routes (``webhook-verify``), so both answer a given failure alike. The
verifiers themselves (``webhooks/verify``) know nothing of the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apigate.engine.replies import Reply, json_reply
from apigate.webhooks.verify.model import Reason, Verdict, WebhookRequest

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


def webhook_request(exchange: Exchange, body: bytes, now: float) -> WebhookRequest:
    return WebhookRequest(
        method=exchange.method,
        url=public_url(exchange),
        headers=header_map(exchange.headers),
        body=body,
        client_ip=exchange.client_ip,
        now=now,
    )


def verdict_reply(exchange: Exchange, verdict: Verdict) -> Reply | None:
    """The answer when the verdict ends the request (a handshake or a refusal); None when it is an event."""
    if verdict.answer is not None:
        status, answer, content_type = verdict.answer
        return Reply(status, answer, content_type=content_type)
    if verdict.ok:
        return None
    if verdict.reason == Reason.SENDER_NOT_ALLOWED:
        status = 403
    else:
        status = 400 if verdict.reason in MALFORMED else 401
    return refuse(exchange, status, verdict.reason, verdict.message or "the webhook was not verified")


def refuse(
    exchange: Exchange,
    status: int,
    reason: str,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Reply:
    return json_reply(
        status, {"error": message, "reason": str(reason), "request_id": exchange.request_id}, headers
    )


def public_url(exchange: Exchange) -> str:
    """The URL as the sender saw it (scheme and host from trusted proxies' X-Forwarded-* headers)."""
    host = (exchange.forwarded_host or b"").decode("latin-1")
    url = f"{exchange.forwarded_proto.decode('latin-1')}://{host}{exchange.raw_path.decode('latin-1')}"
    return f"{url}?{exchange.query.decode('latin-1')}" if exchange.query else url


def header_map(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in headers:
        found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return found
