"""The `webhook-verify` policy: check a webhook's signature on a route that passes it through.

For routes.yaml files written for the Pactown gateway (``/webhooks/stripe`` with
``auth: stripe_signature`` and a ``target``): the request is verified on its exact raw bytes with
one of the webhook presets, then proxied to the route's target, whose answer goes back to the
provider. The provider retries what the handler did not take, so nothing is acknowledged that
was not handled; for events kept durably and delivered with retries by the gateway itself,
declare a source under ``webhooks:`` instead.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.registry import register
from apigate.policies.webhook_http import verdict_reply, webhook_request
from apigate.webhooks.verify import SchemeConfig, build_verifier, shorthand_scheme

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange
    from apigate.engine.replies import Reply


class WebhookVerifyConfig(PolicyConfig):
    verify: SchemeConfig


@register
class WebhookVerify(Policy[WebhookVerifyConfig]):
    name = "webhook-verify"
    order = 1000  # with the other authentication policies
    phases = frozenset({"body"})
    shorthand = "auth"  # auth: stripe_signature, hmac_sha256, webhook_secret

    @classmethod
    def expand_shorthand(cls, value: str) -> dict[str, Any] | None:
        """The preset ``value`` names, its secret read from the environment (ValueError when unset)."""
        scheme = shorthand_scheme(value, os.environ)
        return None if scheme is None else {"verify": scheme.model_dump()}

    def prepare(self) -> None:
        self.verifier = build_verifier(self.config.verify)

    def on_body(self, exchange: Exchange, body: bytes) -> Reply | None:
        verdict = self.verifier.verify(webhook_request(exchange, body, time.time()))
        return verdict_reply(exchange, verdict)

    def describe(self) -> dict[str, object]:
        return {"verify": {"scheme": self.config.verify.scheme}}
