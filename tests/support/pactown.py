"""A routes.yaml written for the Pactown gateway, byte for byte: it must load and run unchanged."""

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
