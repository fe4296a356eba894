"""The `webhook-verify` policy: check a webhook's signature on a route that passes it through.

For routes written for the Pactown gateway (``/webhooks/stripe`` with ``auth: stripe_signature`` and a
``target``): the
request is verified on its exact raw bytes with one of the webhook presets, then proxied to the
route's target, whose answer goes back to the provider. The provider retries what the handler
did not take, so nothing is acknowledged that was not handled; for events kept durably and
delivered with retries by the gateway itself, declare a source under ``webhooks:`` instead.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, ClassVar

from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.registry import register
from apigate.webhooks.requests import verdict_reply, webhook_request
from apigate.webhooks.verify import SchemeConfig, build_verifier

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange, Reply
    from apigate.services import Services


class WebhookVerifyConfig(PolicyConfig):
    verify: SchemeConfig


@register
class WebhookVerify(Policy):
    name: ClassVar[str] = "webhook-verify"
    order: ClassVar[int] = 1000  # with the other authentication policies
    Config: ClassVar[type[PolicyConfig]] = WebhookVerifyConfig

    def __init__(self, config: WebhookVerifyConfig, services: Services | None = None) -> None:
        super().__init__(config, services)
        self.verifier = build_verifier(config.verify)

    def on_body(self, exchange: Exchange, body: bytes) -> Reply | None:
        verdict = self.verifier.verify(webhook_request(exchange, body, time.time()))
        return verdict_reply(exchange, verdict)

    def describe(self) -> dict[str, object]:
        return {"verify": {"scheme": self.config.verify.scheme}}
