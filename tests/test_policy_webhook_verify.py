"""webhook-verify: the Pactown gateway's webhook routes verify signatures, then pass the request through."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest

from tests.support.errors_helpers import request

STRIPE_SECRET = "whsec_test_0123456789abcdef"
INPOST_SECRET = "inpost-secret-0123456789"
GITHUB_SECRET = "It's a Secret to Everybody"


@pytest.fixture
def gateway(start_gateway, upstream):
    config = {
        "routes": [
            # routes as a routes.yaml written for the Pactown gateway has them
            {"path": "/webhooks/allegro", "target": upstream.url, "auth": "webhook_secret"},
            {"path": "/webhooks/inpost", "target": upstream.url, "auth": "hmac_sha256"},
            {"path": "/webhooks/stripe", "target": upstream.url, "auth": "stripe_signature"},
            {
                "path": "/hooks/github",
                "target": upstream.url,
                "policies": {"webhook-verify": {"verify": {"scheme": "github", "secrets": [GITHUB_SECRET]}}},
            },
        ]
    }
    # ALLEGRO_WEBHOOK_SECRET is left unset: that route must refuse, not pass requests unverified.
    env = {"STRIPE_WEBHOOK_SECRET": STRIPE_SECRET, "INPOST_WEBHOOK_SECRET": INPOST_SECRET}
    return start_gateway(config, env=env)


def stripe_header(body: bytes, secret: str = STRIPE_SECRET, at: float | None = None) -> str:
    timestamp = str(int(time.time() if at is None else at))
    signature = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={signature}"


def test_signed_stripe_event_passes_through_to_the_target(gateway, upstream) -> None:
    body = b'{"id": "evt_1", "type": "charge.succeeded"}'
    response = request(
        gateway.port, "POST", "/webhooks/stripe", {"Stripe-Signature": stripe_header(body)}, body
    )
    assert response.status == 200, response
    seen = upstream.requests[-1]
    assert seen.path == "/webhooks/stripe"
    assert seen.body_length == len(body)
    assert seen.header("stripe-signature") is not None  # the handler may verify it again


@pytest.mark.parametrize(
    ("headers", "body", "reason", "status"),
    [
        ({}, b"{}", "missing_signature", 401),
        ({"Stripe-Signature": "garbage"}, b"{}", "malformed_signature", 400),
        ({"Stripe-Signature": stripe_header(b"{}", secret="whsec_wrong")}, b"{}", "bad_signature", 401),
        ({"Stripe-Signature": stripe_header(b"{}", at=time.time() - 3600)}, b"{}", "stale_timestamp", 401),
        ({"Stripe-Signature": stripe_header(b'{"a": 1}')}, b'{"a": 2}', "bad_signature", 401),
    ],
    ids=["missing", "malformed", "wrong-secret", "stale", "tampered"],
)
def test_stripe_refusals_never_reach_the_target(gateway, upstream, headers, body, reason, status) -> None:
    before = len(upstream.requests)
    response = request(gateway.port, "POST", "/webhooks/stripe", headers, body)
    assert response.status == status, response
    assert response.json()["reason"] == reason
    assert len(upstream.requests) == before


def test_inpost_hex_signature(gateway, upstream) -> None:
    body = b'{"status": "delivered"}'
    good = "sha256=" + hmac.new(INPOST_SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert request(gateway.port, "POST", "/webhooks/inpost", {"X-InPost-Signature": good}, body).status == 200
    bad = request(gateway.port, "POST", "/webhooks/inpost", {"X-InPost-Signature": good}, body + b" ")
    assert bad.status == 401


def test_github_vector_through_an_explicit_policy(gateway) -> None:
    # GitHub's documented example: this secret and payload give this signature.
    body = b"Hello, World!"
    signature = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    headers = {"X-Hub-Signature-256": signature, "X-GitHub-Event": "ping", "X-GitHub-Delivery": "1"}
    assert request(gateway.port, "POST", "/hooks/github", headers, body).status == 200


def test_a_shorthand_without_its_secret_refuses_instead_of_passing_unverified(gateway, upstream) -> None:
    before = len(upstream.requests)
    response = request(gateway.port, "POST", "/webhooks/allegro", {"X-Allegro-Signature": "00"}, b"{}")
    assert response.status == 503
    assert response.json()["reason"] == "auth_not_configured"
    assert len(upstream.requests) == before
    routes = request(gateway.port, "GET", "/routes").json()["routes"]
    assert routes[0]["inactive"] == ["auth: webhook_secret"]
    assert STRIPE_SECRET not in str(routes) and INPOST_SECRET not in str(routes)
