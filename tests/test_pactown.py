"""A routes.yaml written for the Pactown gateway, run by `apigate run` with the environment that
gateway reads: ROUTES_CONFIG, PORT, DEFAULT_TIMEOUT, MAX_RETRIES, the webhook secrets and
JWT_SECRET (or JWT_SECRET_KEY). The file is the fixture copy, whose targets point at upstreams
of the test's own through ${VARIABLE:-original URL}; real gateway processes, real sockets.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from apigate.policies.jwt import JwtPolicy
from tests.support.errors_helpers import Launched, Response, apigate_cmd, assert_error, clean_env, free_port
from tests.support.errors_helpers import request as send
from tests.support.jwks_server import claims, hs_sign
from tests.support.limits import frozen_at
from tests.support.pactown import (
    PACTOWN_ENV,
    PACTOWN_FIXTURE,
    PACTOWN_ROUTES_YAML,
    PACTOWN_VARIABLES,
    TARGET_VARIABLES,
    pactown_signature,
)
from tests.support.upstream import UpstreamServer

JWT_SECRET = "jwt-secret-for-the-pactown-tests-0123"  # 37 bytes: HS256 needs at least 32
OTHER_SECRET = "another-secret-of-enough-bytes-456789"
WEBHOOKS = {  # provider -> its route and the variable with its secret
    "allegro": ("/webhooks/allegro", "ALLEGRO_WEBHOOK_SECRET"),
    "inpost": ("/webhooks/inpost", "INPOST_WEBHOOK_SECRET"),
    "stripe": ("/webhooks/stripe", "STRIPE_WEBHOOK_SECRET"),
}
REFUSED = "; its requests are refused (503) until then"
# Runs `apigate run` in this process after stopping the limits' clock (tests/support/frozen_clock.py)
# at $LIMITS_FROZEN_NOW: a plugin would have to be named in the file, which stays as it is.
FROZEN_RUN = (
    "import runpy, tests.support.frozen_clock\n"
    "runpy.run_module('apigate', run_name='__main__', alter_sys=True)"
)
FROZEN_NOW = 1_799_999_990.0  # 10 s before a minute's edge: no window rolls over during a test


@dataclass
class Pactown:
    port: int
    process: Launched

    def call(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> Response:
        return send(self.port, method, path, headers, body)

    def get_api(self, token: str | None, path: str = "/api/v1/orders") -> Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return self.call("GET", path, headers)


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, UpstreamServer]]:
    """One upstream per route of the file, by route path."""
    servers = {path: UpstreamServer().start() for path in TARGET_VARIABLES}
    yield servers
    for server in servers.values():
        server.stop()


@contextmanager
def pactown(
    tmp: Path, upstreams: dict[str, UpstreamServer], env: dict[str, str], frozen: bool = False
) -> Iterator[Pactown]:
    """`apigate run` (no -c) in ``tmp`` with ROUTES_CONFIG naming the fixture, PORT, the targets,
    and ``env``; none of the Pactown gateway's variables comes from the test's own environment."""
    port = free_port()
    base = {k: v for k, v in clean_env().items() if k not in PACTOWN_VARIABLES}
    targets = {TARGET_VARIABLES[path]: server.url for path, server in upstreams.items()}
    full = {**base, **targets, "ROUTES_CONFIG": str(PACTOWN_FIXTURE), "PORT": str(port), **env}
    command = apigate_cmd("run")
    if frozen:
        full.update(frozen_at(FROZEN_NOW))
        command = [sys.executable, "-c", FROZEN_RUN, "run"]
    process = Launched(command, tmp, full, tmp / "gateway.log")
    try:
        process.wait_listening(port)
        yield Pactown(port, process)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, upstreams: dict[str, UpstreamServer]
) -> Iterator[Pactown]:
    env = {**PACTOWN_ENV, "JWT_SECRET": JWT_SECRET, "DEFAULT_TIMEOUT": "12", "MAX_RETRIES": "3"}
    with pactown(tmp_path_factory.mktemp("pactown"), upstreams, env) as running:
        yield running


def test_the_fixture_is_the_documents_file_with_its_targets_from_the_environment() -> None:
    text = PACTOWN_FIXTURE.read_text()
    assert re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text) == PACTOWN_ROUTES_YAML
    changed = [a for a, b in zip(text.splitlines(), PACTOWN_ROUTES_YAML.splitlines(), strict=True) if a != b]
    assert len(changed) == 4 and all(line.startswith("    target: ${") for line in changed)


def test_every_route_serves_with_the_documents_environment(gateway: Pactown, upstreams) -> None:
    routes = {r["path"]: r for r in gateway.call("GET", "/routes").json()["routes"]}
    assert list(routes) == list(TARGET_VARIABLES)
    assert {path: sorted(r["policies"]) for path, r in routes.items()} == {
        "/webhooks/allegro": ["rate-limit", "webhook-verify"],
        "/webhooks/inpost": ["webhook-verify"],
        "/webhooks/stripe": ["webhook-verify"],
        "/api/v1/*": ["cache", "jwt", "rate-limit"],
    }
    assert not [r for r in routes.values() if "inactive" in r]  # every shorthand is active
    assert routes["/api/v1/*"]["policies"]["cache"]["ttl"] == 60.0
    api = routes["/api/v1/*"]
    assert api["policies"]["jwt"]["algorithms"] == ["HS256"]
    assert api["policies"]["jwt"]["secret"] == "***"
    assert JWT_SECRET not in str(routes)
    assert all(r["timeout"] == 12.0 and r["retries"]["attempts"] == 3 for r in routes.values())

    for provider, (path, variable) in WEBHOOKS.items():
        body = b'{"id": "evt_1", "type": "ping"}'
        response = gateway.call("POST", path, pactown_signature(provider, body, PACTOWN_ENV[variable]), body)
        assert response.status == 200, response
        assert upstreams[path].requests[-1].path == path
    token = hs_sign(claims(), secret=JWT_SECRET)
    response = gateway.get_api(token)
    assert response.status == 200, response
    seen = upstreams["/api/v1/*"].requests[-1]
    assert (seen.path, seen.header("authorization")) == ("/api/v1/orders", f"Bearer {token}")

    log = gateway.process.output()
    assert "not active" not in log, log


def test_api_v1_answers_are_cached_per_token_subject(gateway: Pactown, upstreams) -> None:
    """``cache: 60s`` behind ``auth: jwt``: a repeated GET within 60 s is answered from the cache,
    but only to the subject it was stored for; a request without a valid token never reaches it."""
    backend = upstreams["/api/v1/*"]
    path = "/api/v1/orders?page=2"

    def calls() -> int:
        return sum(1 for seen in list(backend.requests) if seen.query == "page=2")

    alice = hs_sign(claims(sub="alice"), secret=JWT_SECRET)
    first = gateway.get_api(alice, path)
    assert first.status == 200 and first.header("x-cache") == "MISS"
    again = gateway.get_api(alice, path)
    assert again.status == 200 and again.header("x-cache") == "HIT" and again.body == first.body
    assert calls() == 1
    # Another token of the same subject is the same caller.
    renewed = hs_sign(claims(sub="alice", jti="renewed"), secret=JWT_SECRET)
    assert gateway.get_api(renewed, path).header("x-cache") == "HIT"
    assert calls() == 1
    bob = hs_sign(claims(sub="bob"), secret=JWT_SECRET)
    theirs = gateway.get_api(bob, path)
    assert theirs.status == 200 and theirs.header("x-cache") == "MISS"
    assert bob.encode() in theirs.body and alice.encode() not in theirs.body
    assert gateway.get_api(bob, path).header("x-cache") == "HIT"
    assert calls() == 2
    for token in (None, hs_sign(claims(sub="alice"), secret=OTHER_SECRET)):
        refused = gateway.get_api(token, path)
        assert refused.status == 401 and refused.header("x-cache") is None
        assert alice.encode() not in refused.body and b"orders" not in refused.body
    assert calls() == 2


@pytest.mark.parametrize(
    ("secret", "overrides", "reason"),
    [
        (None, {}, "missing_token"),
        (OTHER_SECRET, {}, "invalid_token"),
        (JWT_SECRET, {"iat": 1_699_999_000, "exp": 1_700_000_000}, "token_expired"),
        (JWT_SECRET, {"nbf": 4_000_000_000}, "token_not_yet_valid"),
        (JWT_SECRET, {"exp": None}, "missing_claim"),
        (JWT_SECRET, {"alg": "HS512"}, "invalid_token"),
    ],
    ids=["none", "wrong-signature", "expired", "not-yet-valid", "no-exp", "other-algorithm"],
)
def test_api_v1_refuses_what_is_not_a_valid_token_signed_with_jwt_secret(
    gateway: Pactown, upstreams, secret: str | None, overrides: dict, reason: str
) -> None:
    backend = upstreams["/api/v1/*"]
    before = len(backend.requests)
    token = None
    if secret is not None:
        given = dict(overrides)
        alg = given.pop("alg", "HS256")
        token = hs_sign(claims(**given), alg=alg, secret=secret * 2 if alg == "HS512" else secret)
    response = gateway.get_api(token)
    assert_error(response, 401, reason)
    assert (response.header("www-authenticate") or "").startswith("Bearer")
    assert token is None or token.encode() not in response.body
    assert len(backend.requests) == before


def test_jwt_secret_key_is_read_when_jwt_secret_is_unset(tmp_path: Path, upstreams) -> None:
    # Compose writes JWT_SECRET= for a variable it has no value for: empty counts as unset.
    with pactown(tmp_path, upstreams, {"JWT_SECRET": "", "JWT_SECRET_KEY": OTHER_SECRET}) as running:
        assert running.get_api(hs_sign(claims(), secret=OTHER_SECRET)).status == 200
        assert_error(running.get_api(hs_sign(claims(), secret=JWT_SECRET)), 401, "invalid_token")


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({}, "set JWT_SECRET or JWT_SECRET_KEY to the secret its HS256 tokens are signed with"),
        (
            # The first variable that is set is the one meant: a short one is not passed over.
            {"JWT_SECRET": "too-short-secret", "JWT_SECRET_KEY": OTHER_SECRET},
            "JWT_SECRET holds 16 bytes and an HS256 secret needs at least 32 (RFC 7518 §3.2): "
            "set it to a longer random secret",
        ),
    ],
    ids=["unset", "too-short"],
)
def test_without_a_usable_jwt_secret_the_api_is_closed_and_the_log_says_what_to_set(
    tmp_path: Path, upstreams, env: dict[str, str], why: str
) -> None:
    backend = upstreams["/api/v1/*"]
    with pactown(tmp_path, upstreams, {**PACTOWN_ENV, **env}) as running:
        before = len(backend.requests)
        for secret in (JWT_SECRET, OTHER_SECRET):
            assert_error(running.get_api(hs_sign(claims(), secret=secret)), 503, "auth_not_configured")
        assert_error(running.get_api(None), 503, "auth_not_configured")
        assert len(backend.requests) == before
        routes = running.call("GET", "/routes").json()["routes"]
        assert routes[3]["inactive"] == ["auth: jwt"]
        assert "jwt" not in routes[3]["policies"]
        # The webhooks, whose secrets are set, are served.
        body = b"{}"
        signed = pactown_signature("inpost", body, PACTOWN_ENV["INPOST_WEBHOOK_SECRET"])
        assert running.call("POST", "/webhooks/inpost", signed, body).status == 200
    log = running.process.output()
    assert log.count(f"route /api/v1/*: auth: jwt not active: {why}{REFUSED}\n") == 1, log


@pytest.mark.parametrize("provider", list(WEBHOOKS))
def test_webhook_routes_verify_their_signatures(gateway: Pactown, upstreams, provider: str) -> None:
    path, variable = WEBHOOKS[provider]
    handler = upstreams[path]
    body = b'{"id": "evt_2", "status": "delivered"}'
    signed = pactown_signature(provider, body, PACTOWN_ENV[variable])
    before = len(handler.requests)
    assert gateway.call("POST", path, signed, body).status == 200
    assert handler.requests[-1].body_length == len(body)
    wrong = pactown_signature(provider, body, "not-the-secret")
    assert_error(gateway.call("POST", path, wrong, body), 401, "bad_signature")
    assert_error(gateway.call("POST", path, signed, body + b" "), 401, "bad_signature")
    unsigned = gateway.call("POST", path, {}, body)
    assert unsigned.status in (400, 401) and unsigned.json()["reason"] == "missing_signature"
    assert len(handler.requests) == before + 1


def test_rate_limit_shorthands_count_per_client(tmp_path: Path, upstreams) -> None:
    handler = upstreams["/webhooks/allegro"]
    body = b'{"id": "evt_3"}'
    signed = pactown_signature("allegro", body, PACTOWN_ENV["ALLEGRO_WEBHOOK_SECRET"])
    with pactown(tmp_path, upstreams, {**PACTOWN_ENV, "JWT_SECRET": JWT_SECRET}, frozen=True) as running:
        api = running.get_api(hs_sign(claims(), secret=JWT_SECRET))
        assert api.status == 200
        assert (api.header("x-ratelimit-limit"), api.header("x-ratelimit-remaining")) == ("1000", "999")
        before = len(handler.requests)
        answers = [running.call("POST", "/webhooks/allegro", signed, body) for _ in range(101)]
        assert [a.status for a in answers[:100]] == [200] * 100
        assert answers[99].header("x-ratelimit-remaining") == "0"
        refused = answers[100]
        assert refused.status == 429 and refused.json()["reason"] == "rate_limited"
        assert refused.header("retry-after") == "11"  # the frozen clock is 10 s before the minute
        assert len(handler.requests) == before + 100


def test_auth_jwt_reads_its_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("JWT_SECRET", "JWT_SECRET_KEY"):
        monkeypatch.delenv(variable, raising=False)
    assert JwtPolicy.expand_shorthand("stripe_signature") is None
    with pytest.raises(ValueError, match="set JWT_SECRET or JWT_SECRET_KEY"):
        JwtPolicy.expand_shorthand("jwt")
    monkeypatch.setenv("JWT_SECRET_KEY", OTHER_SECRET)
    assert JwtPolicy.expand_shorthand("jwt") == {"algorithms": ["HS256"], "secret": OTHER_SECRET}
    monkeypatch.setenv("JWT_SECRET", JWT_SECRET)
    assert JwtPolicy.expand_shorthand("jwt") == {"algorithms": ["HS256"], "secret": JWT_SECRET}
    monkeypatch.setenv("JWT_SECRET", "é" * 15)  # 30 bytes, though 15 characters
    with pytest.raises(ValueError, match="JWT_SECRET holds 30 bytes"):
        JwtPolicy.expand_shorthand("jwt")
