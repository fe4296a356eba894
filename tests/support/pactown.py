"""A routes.yaml written for the Pactown gateway, byte for byte: it must load and run unchanged.

Also what the tests that run it share: the fixture copy whose targets come from the environment,
the variables that file's gateway reads, and webhooks signed the way that gateway checks them.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

# The blank lines between routes hold four spaces, as in that file.
PACTOWN_ROUTES_YAML = """\
routes:
  - path: /webhooks/allegro
    target: http://allegro-handler:8080
    auth: webhook_secret
    rate_limit: 100/min
\x20\x20\x20\x20
  - path: /webhooks/inpost
    target: http://inpost-handler:8080
    auth: hmac_sha256
\x20\x20\x20\x20
  - path: /webhooks/stripe
    target: http://stripe-handler:8080
    auth: stripe_signature
\x20\x20\x20\x20
  - path: /api/v1/*
    target: http://backend:8080
    auth: jwt
    cache: 60s
    rate_limit: 1000/min
"""

# The same file with each target written ${VARIABLE:-the original URL}, so that a test points the
# targets at its own upstreams through the environment and changes nothing else.
PACTOWN_FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "pactown-routes.yaml"
TARGET_VARIABLES = {
    "/webhooks/allegro": "ALLEGRO_HANDLER_URL",
    "/webhooks/inpost": "INPOST_HANDLER_URL",
    "/webhooks/stripe": "STRIPE_HANDLER_URL",
    "/api/v1/*": "BACKEND_URL",
}

# The variables the Pactown gateway reads, besides the targets above.
PACTOWN_VARIABLES = (
    "ROUTES_CONFIG",
    "PORT",
    "DEFAULT_TIMEOUT",
    "MAX_RETRIES",
    "ALLEGRO_WEBHOOK_SECRET",
    "INPOST_WEBHOOK_SECRET",
    "STRIPE_WEBHOOK_SECRET",
    "JWT_SECRET",
    "JWT_SECRET_KEY",
)

PACTOWN_ENV = {
    "ALLEGRO_WEBHOOK_SECRET": "allegro-env-secret",
    "INPOST_WEBHOOK_SECRET": "inpost-env-secret",
    "STRIPE_WEBHOOK_SECRET": "whsec_stripe_env_secret",
}


def pactown_signature(
    provider: str, body: bytes, secret: str, timestamp: int | None = None
) -> dict[str, str]:
    """Signed the way the Pactown gateway's verify_webhook_signature checks each provider
    (``timestamp``: Stripe's, default now)."""
    if provider == "allegro":
        return {"x-allegro-signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()}
    if provider == "inpost":
        return {"x-inpost-signature": "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()}
    at = int(time.time()) if timestamp is None else timestamp
    payload = f"{at}.{body.decode()}"
    expected = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
    return {"stripe-signature": f"t={at},v1={expected}"}
