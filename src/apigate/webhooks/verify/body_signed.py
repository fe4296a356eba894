"""Providers that sign the raw body alone: GitHub, Shopify and the Pactown gateway's Allegro scheme.

None of them signs a timestamp, so replays are caught only by de-duplicating the event id.
"""

from __future__ import annotations

from typing import Literal

from apigate.webhooks.verify.common import SchemeBase, Secrets, first_of, from_header, joined, secret_bytes
from apigate.webhooks.verify.signed import HmacRule, HmacVerifier

# GitHub's "Validating webhook deliveries": X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>.
GITHUB_RULE = HmacRule(headers=("x-hub-signature-256",), prefix="sha256=")
# Shopify: base64 HMAC-SHA256 of the body; the Events API drops the X- prefix.
SHOPIFY_RULE = HmacRule(headers=("x-shopify-hmac-sha256", "shopify-hmac-sha256"), encoding="base64")
# The Pactown gateway's Allegro scheme: X-Allegro-Signature is the bare hex HMAC-SHA256 of the body.
ALLEGRO_RULE = HmacRule(headers=("x-allegro-signature",))


class GithubConfig(SchemeBase):
    """Event id: ``X-GitHub-Hook-ID:X-GitHub-Delivery`` (the delivery GUID alone when the hook id is
    absent); type: ``X-GitHub-Event``."""

    scheme: Literal["github"]
    secrets: Secrets

    def build(self) -> HmacVerifier:
        delivery = from_header("x-github-delivery")
        return HmacVerifier(
            self,
            secret_bytes(self.secrets),
            GITHUB_RULE,
            event_id=first_of(joined(from_header("x-github-hook-id"), delivery), delivery),
            event_type=from_header("x-github-event"),
        )


class ShopifyConfig(SchemeBase):
    """Event id: ``X-Shopify-Event-Id`` (Shopify's advice for duplicates), else
    ``X-Shopify-Webhook-Id`` / ``Shopify-Webhook-Id``; type: ``X-Shopify-Topic``."""

    scheme: Literal["shopify"]
    secrets: Secrets

    def build(self) -> HmacVerifier:
        return HmacVerifier(
            self,
            secret_bytes(self.secrets),
            SHOPIFY_RULE,
            event_id=first_of(
                from_header("x-shopify-event-id"),
                from_header("x-shopify-webhook-id"),
                from_header("shopify-webhook-id"),
            ),
            event_type=from_header("x-shopify-topic"),
        )


class AllegroConfig(SchemeBase):
    """The Pactown gateway's scheme. Allegro's REST API itself pushes no webhooks (order events are polled);
    this serves senders that relay them signed this way. No event id unless configured."""

    scheme: Literal["allegro"]
    secrets: Secrets

    def build(self) -> HmacVerifier:
        return HmacVerifier(self, secret_bytes(self.secrets), ALLEGRO_RULE)
