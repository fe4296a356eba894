"""Slack: ``X-Slack-Signature: v0=<hex HMAC-SHA256 of "v0:{X-Slack-Request-Timestamp}:{body}">``,
the timestamp within 5 minutes either way (as Slack's SDK checks).

Slack's Events API checks a new request URL with a signed ``{"type": "url_verification",
"challenge": ...}``; once verified, the verifier answers it with the challenge (a handshake, not an
event) unless ``answer_url_verification`` is false.
"""

from __future__ import annotations

from typing import Literal

from apigate.webhooks.verify.common import (
    BodyJson,
    SchemeBase,
    Secrets,
    Tolerance,
    first_of,
    from_json,
    handshake,
    secret_bytes,
)
from apigate.webhooks.verify.model import Verdict, WebhookRequest
from apigate.webhooks.verify.signed import HmacRule, HmacVerifier, compile_template

MAX_CHALLENGE_CHARS = 1024


class SlackConfig(SchemeBase):
    """Event id: body ``event_id`` (Events API); type: ``event.type``, else the body's ``type``."""

    scheme: Literal["slack"]
    secrets: Secrets
    tolerance: Tolerance = 300.0
    answer_url_verification: bool = True

    def build(self) -> SlackVerifier:
        return SlackVerifier(self)


class SlackVerifier(HmacVerifier):
    def __init__(self, config: SlackConfig) -> None:
        rule = HmacRule(
            headers=("x-slack-signature",),
            prefix="v0=",
            template=compile_template("v0:{timestamp}:{body}"),
            timestamp_header="x-slack-request-timestamp",
            tolerance=config.tolerance,
        )
        super().__init__(
            config,
            secret_bytes(config.secrets),
            rule,
            event_id=from_json("event_id"),
            event_type=first_of(from_json("event.type"), from_json("type")),
        )
        self._answers_challenge = config.answer_url_verification

    def check(self, request: WebhookRequest, body: BodyJson) -> Verdict | None:
        super().check(request, body)
        if self._answers_challenge and body.field(("type",)) == "url_verification":
            challenge = body.field(("challenge",))
            if isinstance(challenge, str) and len(challenge) <= MAX_CHALLENGE_CHARS:
                return handshake(200, challenge.encode("utf-8"), b"text/plain; charset=utf-8")
        return None
