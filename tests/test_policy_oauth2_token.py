"""The oauth2-token policy end to end: consumers and their secrets and logins made with the CLI in
a SQLite store, a real gateway that issues tokens on /oauth/token and /api/auth/login, and the
jwt policy (same key) and authorize accepting them in front of a real upstream."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jwt
import pytest

from apigate.consumers.passwords import hash_password
from apigate.policies.registry import validate_policy_config
from tests.support.errors_helpers import Response, request
from tests.support.gateway import GatewayProcess
from tests.support.jwks_server import SigningKey
from tests.support.proxy_http import running_gateway, running_upstream

SECRET = "an HS256 signing secret of more than 32 bytes"
CLIENT_SECRET = "client:secret/with+special chars"
ISSUER = "https://gateway.test"


@dataclass
class Env:
    gateway: GatewayProcess
    rs_key: SigningKey


def cli(cwd: Path, store: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apigate", *args, "--store", store],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    directory = tmp_path_factory.mktemp("oauth2_token")
    store = f"sqlite:///{directory / 'apigate.db'}"
    setup = [
        (("consumers", "create", "svc", "--tenant", "acme", "--group", "robots"), ""),
        (
            ("consumers", "set-secret", "svc", "--scope", "orders:read", "--scope", "orders:write"),
            CLIENT_SECRET,
        ),
        (("consumers", "create", "frank"), ""),
        (
            ("consumers", "set-password", "frank", "frank@example.com", "--scope", "orders:read"),
            "hunter2hunter2",
        ),
    ]
    for args, stdin in setup:
        done = cli(directory, store, *args, stdin=stdin + "\n")
        assert done.returncode == 0, done.stderr
        assert not stdin or stdin not in done.stdout + done.stderr
    rs_key = SigningKey.generate("RS256", kid="rs-1")
    key_file = directory / "signing.pem"
    key_file.write_bytes(rs_key.private_pem)
    hs = {"secret": SECRET, "issuer": ISSUER, "audience": "orders-api"}
    with running_upstream() as upstream:
        config = {
            "store": {"url": store},
            # The Pactown gateway's login: a config consumer whose id is the login name.
            "consumers": [{"id": "testuser", "password_hash": hash_password("testpass")}],
            "routes": [
                {
                    "path": "/oauth/token",
                    "policies": {"oauth2-token": {**hs, "grants": ["client_credentials", "password"]}},
                },
                {"path": "/api/auth/login", "policies": {"oauth2-token": {**hs, "grants": ["password"]}}},
                {
                    "path": "/rs/token",
                    "policies": {
                        "oauth2-token": {
                            "algorithm": "RS256",
                            "private_key_file": str(key_file),
                            "key_id": "rs-1",
                        }
                    },
                },
                {
                    "path": "/api/*",
                    "target": upstream.url,
                    "policies": {"jwt": {"algorithms": ["HS256"], **hs}},
                },
                {
                    "path": "/orders/*",
                    "target": upstream.url,
                    "policies": {
                        "jwt": {"algorithms": ["HS256"], **hs},
                        "authorize": {"scopes": ["orders:write"], "groups": ["robots"], "tenants": ["acme"]},
                    },
                },
                {
                    "path": "/rs/api/*",
                    "target": upstream.url,
                    "policies": {
                        "jwt": {"algorithms": ["RS256"], "public_key": rs_key.public_pem, "issuer": "apigate"}
                    },
                },
            ],
        }
        with running_gateway(directory / "gw", config) as gateway:
            yield Env(gateway, rs_key)


def basic(client_id: str, secret: str) -> str:
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def post(
    env: Env,
    path: str,
    body: bytes | dict[str, str],
    content_type: str | None = None,
    headers: list | None = None,
) -> Response:
    if isinstance(body, dict):
        body, content_type = urlencode(body).encode(), content_type or "application/x-www-form-urlencoded"
    pairs = list(headers or [])
    if content_type is not None:
        pairs.append(("Content-Type", content_type))
    return request(env.gateway.port, "POST", path, pairs, body)


def issued(response: Response) -> dict[str, Any]:
    assert response.status == 200, response
    assert response.header("cache-control") == "no-store"
    data = response.json()
    assert set(data) == {"access_token", "token_type", "expires_in", "scope"}
    assert data["token_type"] == "Bearer" and data["expires_in"] == 300
    return data


def refused(response: Response, status: int, error: str) -> str:
    assert response.status == status, response
    data = response.json()
    assert data["error"] == error, data
    assert set(data) == {"error", "error_description", "request_id"}
    assert CLIENT_SECRET not in response.body.decode()
    return data["error_description"]


def claims_of(token: str, key: Any = SECRET, algorithm: str = "HS256", **options: Any) -> dict[str, Any]:
    return jwt.decode(token, key, algorithms=[algorithm], **options)


# -- client credentials ----------------------------------------------------------------------------
def test_client_credentials_with_basic_auth(env: Env) -> None:
    response = post(
        env,
        "/oauth/token",
        {"grant_type": "client_credentials"},
        headers=[("Authorization", basic("svc", CLIENT_SECRET))],
    )
    data = issued(response)
    assert data["scope"] == "orders:read orders:write"
    claims = claims_of(data["access_token"], audience="orders-api", issuer=ISSUER)
    assert claims["sub"] == claims["client_id"] == "svc"
    assert claims["tenant"] == "acme" and claims["groups"] == ["robots"]
    assert claims["exp"] - claims["iat"] == 300
    assert claims["scope"] == "orders:read orders:write" and len(claims["jti"]) >= 16


def test_client_credentials_in_the_body_form_and_json(env: Env) -> None:
    form = {
        "grant_type": "client_credentials",
        "client_id": "svc",
        "client_secret": CLIENT_SECRET,
        "scope": "orders:read",
    }
    assert issued(post(env, "/oauth/token", form))["scope"] == "orders:read"
    body = json.dumps(form).encode()
    token = issued(post(env, "/oauth/token", body, "application/json; charset=utf-8"))["access_token"]
    assert claims_of(token, audience="orders-api")["scope"] == "orders:read"
    first, second = (issued(post(env, "/oauth/token", form))["access_token"] for _ in range(2))
    assert claims_of(first, audience="orders-api")["jti"] != claims_of(second, audience="orders-api")["jti"]


def test_issued_tokens_pass_the_jwt_policy_and_authorize(env: Env) -> None:
    auth = [("Authorization", basic("svc", CLIENT_SECRET))]
    full = issued(post(env, "/oauth/token", {"grant_type": "client_credentials"}, headers=auth))[
        "access_token"
    ]
    narrow = issued(
        post(env, "/oauth/token", {"grant_type": "client_credentials", "scope": "orders:read"}, headers=auth)
    )
    bearer = {"Authorization": f"Bearer {full}"}
    assert request(env.gateway.port, "GET", "/api/x", bearer).status == 200
    assert request(env.gateway.port, "POST", "/orders/1", bearer).status == 200
    response = request(
        env.gateway.port, "POST", "/orders/1", {"Authorization": f"Bearer {narrow['access_token']}"}
    )
    assert response.status == 403 and response.json()["reason"] == "insufficient_scope"


def test_rs256_tokens_verify_with_the_public_key(env: Env) -> None:
    form = {"grant_type": "client_credentials", "client_id": "svc", "client_secret": CLIENT_SECRET}
    token = issued(post(env, "/rs/token", form))["access_token"]
    assert jwt.get_unverified_header(token)["kid"] == "rs-1"
    assert claims_of(token, env.rs_key.private.public_key(), "RS256")["sub"] == "svc"
    assert request(env.gateway.port, "GET", "/rs/api/x", {"Authorization": f"Bearer {token}"}).status == 200


@pytest.mark.parametrize(
    ("client_id", "secret"),
    [
        ("svc", "wrong secret"),
        ("nobody", CLIENT_SECRET),
        ("frank", "hunter2hunter2"),
        ("testuser", "testpass"),
    ],
    ids=["wrong-secret", "unknown-client", "login-is-not-a-client", "config-password-is-not-a-secret"],
)
def test_invalid_client(env: Env, client_id: str, secret: str) -> None:
    response = post(
        env,
        "/oauth/token",
        {"grant_type": "client_credentials"},
        headers=[("Authorization", basic(client_id, secret))],
    )
    refused(response, 401, "invalid_client")
    assert response.header("www-authenticate") == 'Basic realm="apigate"'
    form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    refused(post(env, "/oauth/token", form), 401, "invalid_client")


# -- the password grant and the Pactown gateway's login -----------------------------------------------------
def test_pactown_login_with_a_json_body(env: Env) -> None:
    body = json.dumps({"username": "testuser", "password": "testpass"}).encode()
    token = issued(post(env, "/api/auth/login", body, "application/json"))["access_token"]
    assert claims_of(token, audience="orders-api")["sub"] == "testuser"
    assert (
        request(env.gateway.port, "GET", "/api/services", {"Authorization": f"Bearer {token}"}).status == 200
    )
    wrong = json.dumps({"username": "testuser", "password": "nope"}).encode()
    refused(post(env, "/api/auth/login", wrong, "application/json"), 400, "invalid_grant")


def test_password_grant_with_a_stored_login(env: Env) -> None:
    form = {"grant_type": "password", "username": "frank@example.com", "password": "hunter2hunter2"}
    data = issued(post(env, "/oauth/token", form))
    claims = claims_of(data["access_token"], audience="orders-api")
    assert claims["sub"] == "frank" and claims["username"] == "frank@example.com"
    assert data["scope"] == "orders:read"
    refused(post(env, "/oauth/token", {**form, "password": "hunter3hunter3"}), 400, "invalid_grant")
    refused(post(env, "/oauth/token", {**form, "username": "ghost"}), 400, "invalid_grant")


# -- bad requests ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "content_type", "error", "mentions"),
    [
        (
            b"grant_type=authorization_code&code=x",
            "application/x-www-form-urlencoded",
            "unsupported_grant_type",
            "",
        ),
        (b"client_id=svc", "application/x-www-form-urlencoded", "invalid_request", "grant_type"),
        (
            b"grant_type=password&password=x",
            "application/x-www-form-urlencoded",
            "invalid_request",
            "username",
        ),
        (
            b"grant_type=password&grant_type=password",
            "application/x-www-form-urlencoded",
            "invalid_request",
            "grant_type",
        ),
        (
            b'{"grant_type": "password", "username": 5, "password": "x"}',
            "application/json",
            "invalid_request",
            "username",
        ),
        (b'{"grant_type": ', "application/json", "invalid_request", "JSON"),
        (b"[1, 2]", "application/json", "invalid_request", "object"),
        (b"\xff\xfe", "application/x-www-form-urlencoded", "invalid_request", "UTF-8"),
        (b"grant_type=client_credentials", "text/plain", "invalid_request", "application/json"),
        (b"grant_type=client_credentials", None, "invalid_request", "application/json"),
        (
            b"grant_type=client_credentials&client_id=svc",
            "application/x-www-form-urlencoded",
            "invalid_request",
            "client_secret",
        ),
    ],
)
def test_malformed_requests_name_the_problem(
    env: Env, body: bytes, content_type: str | None, error: str, mentions: str
) -> None:
    description = refused(post(env, "/oauth/token", body, content_type), 400, error)
    assert mentions in description


def test_scope_beyond_the_clients_is_invalid_scope(env: Env) -> None:
    form = {"grant_type": "client_credentials", "client_id": "svc", "client_secret": CLIENT_SECRET}
    refused(post(env, "/oauth/token", {**form, "scope": "orders:read admin"}), 400, "invalid_scope")
    refused(post(env, "/oauth/token", {**form, "scope": "orders:read  orders:write"}), 400, "invalid_scope")
    refused(post(env, "/oauth/token", {**form, "scope": 'a"b'}), 400, "invalid_scope")


def test_two_client_authentication_methods_are_refused(env: Env) -> None:
    form = {"grant_type": "client_credentials", "client_id": "svc", "client_secret": CLIENT_SECRET}
    response = post(env, "/oauth/token", form, headers=[("Authorization", basic("svc", CLIENT_SECRET))])
    refused(response, 400, "invalid_request")
    response = post(
        env, "/oauth/token", {"grant_type": "client_credentials"}, headers=[("Authorization", "Basic !!")]
    )
    refused(response, 401, "invalid_client")


def test_other_methods_and_huge_bodies(env: Env) -> None:
    response = request(env.gateway.port, "GET", "/oauth/token")
    assert response.status == 405 and response.header("allow") == "POST"
    huge = post(env, "/oauth/token", b"a=" + b"x" * 70_000, "application/x-www-form-urlencoded")
    assert huge.status == 413


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "needs a secret"),
        ({"secret": "short"}, "at least 32 bytes"),
        ({"algorithm": "RS256"}, "needs private_key"),
        ({"algorithm": "RS256", "private_key": "not a key"}, "not an unencrypted PEM"),
        ({"algorithm": "ES256", "private_key": "PEM"}, "not an unencrypted PEM"),
        ({"secret": SECRET, "private_key": "x"}, "algorithm is HS256"),
        ({"secret": SECRET, "grants": ["implicit"]}, "grants"),
        ({"secret": SECRET, "token_ttl": "2d"}, "token_ttl"),
        ({"algorithm": "RS256", "private_key_file": "/nonexistent.pem"}, "cannot read"),
    ],
)
def test_config_errors(config: dict[str, Any], message: str) -> None:
    issues = validate_policy_config("oauth2-token", config, ("policies", "oauth2-token"))
    assert issues and message in str(issues), issues


def test_es256_key_must_be_p256() -> None:
    p384 = SigningKey.generate("ES384").private_pem.decode()
    issues = validate_policy_config("oauth2-token", {"algorithm": "ES256", "private_key": p384}, ("p",))
    assert issues and "P-256" in str(issues)
    p256 = SigningKey.generate("ES256").private_pem.decode()
    assert not validate_policy_config("oauth2-token", {"algorithm": "ES256", "private_key": p256}, ("p",))
