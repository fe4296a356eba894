"""Every scheme's config in one discriminated union, building a verifier from one, and the route
shorthands of routes.yaml files written for the Pactown gateway."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated

from pydantic import Field, TypeAdapter

from apigate.webhooks.verify.body_signed import AllegroConfig, GithubConfig, ShopifyConfig
from apigate.webhooks.verify.inpost import InpostConfig, InpostShipxConfig
from apigate.webhooks.verify.model import Verifier
from apigate.webhooks.verify.shared_secret import BasicConfig, TokenConfig
from apigate.webhooks.verify.signed import HmacConfig
from apigate.webhooks.verify.slack import SlackConfig
from apigate.webhooks.verify.standard import StandardWebhooksConfig
from apigate.webhooks.verify.stripe import StripeConfig
from apigate.webhooks.verify.twilio import TwilioConfig

SchemeConfig = Annotated[
    StripeConfig
    | GithubConfig
    | StandardWebhooksConfig
    | ShopifyConfig
    | SlackConfig
    | TwilioConfig
    | InpostShipxConfig
    | InpostConfig
    | AllegroConfig
    | HmacConfig
    | TokenConfig
    | BasicConfig,
    Field(discriminator="scheme"),
]


def build_verifier(config: SchemeConfig) -> Verifier:
    """The verifier for ``config``; every secret's key material is computed here, once."""
    return config.build()


_SCHEME_CONFIG: TypeAdapter[SchemeConfig] = TypeAdapter(SchemeConfig)

# shorthand -> (scheme, environment variable with its secret); see shorthand_scheme.
_SHORTHANDS = {
    "webhook_secret": ("allegro", "ALLEGRO_WEBHOOK_SECRET"),
    "hmac_sha256": ("inpost", "INPOST_WEBHOOK_SECRET"),
    "stripe_signature": ("stripe", "STRIPE_WEBHOOK_SECRET"),
}


def shorthand_scheme(name: str, env: Mapping[str, str], secrets: Sequence[str] = ()) -> SchemeConfig | None:
    """The preset behind one of the Pactown gateway's route shorthands (``auth: <name>``); None when
    ``name`` is not one of them (e.g. ``jwt``).

    The Pactown gateway uses each shorthand for one provider, and so does this mapping:

    - ``webhook_secret`` (``/webhooks/allegro``): ``allegro``, hex HMAC-SHA256 of the body in
      ``X-Allegro-Signature``, secret ``ALLEGRO_WEBHOOK_SECRET``;
    - ``hmac_sha256`` (``/webhooks/inpost``): ``inpost``, ``X-InPost-Signature: sha256=<hex>``
      (the InPost Group API's base64 form is accepted too), secret ``INPOST_WEBHOOK_SECRET``;
    - ``stripe_signature`` (``/webhooks/stripe``): ``stripe``, secret ``STRIPE_WEBHOOK_SECRET``.

    ``secrets`` given in the route win; without them the variable is read from ``env``, and a
    missing or empty one is a ValueError naming it.
    """
    if name not in _SHORTHANDS:
        return None
    scheme, variable = _SHORTHANDS[name]
    chosen = list(secrets) or ([env[variable]] if env.get(variable) else [])
    if not chosen:
        raise ValueError(f"set {variable} to the provider's signing secret")
    return _SCHEME_CONFIG.validate_python({"scheme": scheme, "secrets": chosen})
