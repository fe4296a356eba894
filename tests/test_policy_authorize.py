"""The `authorize` policy end to end: real gateways in front of the real upstream, consumers with
keys declared in the config (SQLite store) and HS256 tokens signed with PyJWT, so no JWKS server.
Also `required: false` on key-auth and jwt, which makes "either a key or a token" routes."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.errors_helpers import Response, apigate_cmd, clean_env, request, wait_until
from tests.support.gateway import GatewayProcess
from tests.support.jwks_server import HS_SECRET, claims, hs_sign
from tests.support.upstream import UpstreamServer

ALICE_KEY = "alice-key-tenant-a-0123456789abcdef"  # tenant-a, groups staff+ops, scopes read+write
BOB_KEY = "bob-key-tenant-b-0123456789abcdef"  # tenant-b, group guests, scope read
JWT = {"algorithms": ["HS256"], "secret": HS_SECRET}
KEY_CHALLENGE = 'ApiKey realm="apigate", header="X-API-Key"'
BEARER_CHALLENGE = 'Bearer realm="apigate"'


def route(prefix: str, target: str, policies: dict[str, Any]) -> dict[str, Any]:
    return {"path": f"{prefix}/*", "target": target, "strip_prefix": True, "policies": policies}


def config(tmp_path: Path, target: str) -> dict[str, Any]:
    key = {"key-auth": {}}
    jwt = {"jwt": JWT}
    soft_key = {"key-auth": {"required": False}}
    soft_jwt = {"jwt": {**JWT, "required": False}}
    return {
        "store": {"url": f"sqlite:///{tmp_path / 'apigate.db'}"},
        "consumers": [
            {
                "id": "alice",
                "tenant": "tenant-a",
                "groups": ["staff", "ops"],
                "keys": [{"key": ALICE_KEY, "scopes": ["read", "write"]}],
            },
            {
                "id": "bob",
                "tenant": "tenant-b",
                "groups": ["guests"],
                "keys": [{"key": BOB_KEY, "scopes": ["read"]}],
            },
        ],
        "routes": [
            route("/either", target, {**soft_key, **soft_jwt, "authorize": {}}),
            route("/soft", target, {**soft_key, **soft_jwt, "authorize": {"authenticated": False}}),
            route("/public", target, {**soft_jwt, "authorize": {"public": True, "scopes": ["admin"]}}),
            route("/users", target, {**soft_jwt, "authorize": {"public_methods": ["post"]}}),
            route("/scopes-all", target, {**jwt, "authorize": {"scopes": ["read", "write"]}}),
            route(
                "/scopes-any",
                target,
                {**jwt, "authorize": {"scopes": ["read", "write"], "scopes_mode": "any"}},
            ),
            route("/key-scopes", target, {**key, "authorize": {"scopes": ["write"]}}),
            route("/roles-any", target, {**jwt, "authorize": {"roles": ["admin", "editor"]}}),
            route(
                "/roles-all",
                target,
                {**jwt, "authorize": {"roles": ["admin", "editor"], "roles_mode": "all"}},
            ),
            route("/staff", target, {**key, "authorize": {"groups": ["staff"]}}),
            route("/tenant-b", target, {**soft_key, **soft_jwt, "authorize": {"tenants": ["tenant-b"]}}),
            route(
                "/claims",
                target,
                {**jwt, "authorize": {"claims": {"email_verified": True, "plan": ["pro", "enterprise"]}}},
            ),
        ],
    }


@pytest.fixture
def gateway(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, tmp_path: Path
) -> GatewayProcess:
    gw = start_gateway(config(tmp_path, upstream.url))
    # The port is open; poll (with a deadline) until declared keys are served.
    wait_until(
        lambda: call(gw, "/staff/echo", key=ALICE_KEY).status == 200, timeout=15, message="key-auth ready"
    )
    return gw


def call(
    gw: GatewayProcess,
    path: str,
    *,
    key: str | None = None,
    token: str | None = None,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
) -> Response:
    sent = list(headers or [])
    if key is not None:
        sent.append(("X-API-Key", key))
    if token is not None:
        sent.append(("Authorization", f"Bearer {token}"))
    return request(gw.port, method, path, sent)


def token(**overrides: Any) -> str:
    return hs_sign(claims(**overrides))


def ok(response: Response) -> dict[str, Any]:
    assert response.status == 200, (response.status, response.body)
    return response.json()


def denied(response: Response, status: int, reason: str, secret: str | None = None) -> dict[str, Any]:
    assert response.status == status, (response.status, response.body)
    body = response.json()
    assert body["reason"] == reason, body
    assert body["error"] and body["request_id"] == response.header("x-request-id")
    if secret is not None:  # the credential is never echoed
        for part in secret.split("."):
            assert part.encode() not in response.body
    return body


# -- authentication ---------------------------------------------------------------------------------------
def test_either_a_key_or_a_token(gateway: GatewayProcess) -> None:
    seen = ok(call(gateway, "/either/echo", key=ALICE_KEY))["headers"]
    assert seen["x-consumer-id"] == "alice" and "x-api-key" not in seen
    ok(call(gateway, "/either/echo", token=token(sub="carol")))
    ok(call(gateway, "/either/echo", key=ALICE_KEY, token=token()))

    # Neither: authorize answers, with the challenges of both auth policies on the route.
    response = call(gateway, "/either/echo")
    denied(response, 401, "unauthenticated")
    assert sorted(response.header_all("www-authenticate")) == [KEY_CHALLENGE, BEARER_CHALLENGE]

    # A credential that is present but invalid is a 401 even with the other one valid.
    bad_key = "not-a-real-key-0123456789abcdef"
    denied(call(gateway, "/either/echo", key=bad_key), 401, "invalid_key", bad_key)
    denied(call(gateway, "/either/echo", key=bad_key, token=token()), 401, "invalid_key", bad_key)
    forged = hs_sign(claims(), secret="another-secret-" * 4)
    denied(call(gateway, "/either/echo", token=forged), 401, "invalid_token", forged)
    denied(call(gateway, "/either/echo", key=ALICE_KEY, token=forged), 401, "invalid_token", forged)
    denied(call(gateway, "/either/echo", headers=[("Authorization", "Bearer ")]), 401, "invalid_token")


def test_optional_auth_still_replaces_client_sent_identity_headers(
    gateway: GatewayProcess, upstream: UpstreamServer
) -> None:
    marker = f"/soft/echo/{uuid.uuid4().hex}"
    spoof = [("X-Consumer-ID", "admin"), ("X-Tenant-ID", "tenant-b")]
    seen = ok(call(gateway, marker, headers=spoof))["headers"]
    assert "x-consumer-id" not in seen and "x-tenant-id" not in seen
    assert ok(call(gateway, "/soft/echo", key=BOB_KEY, headers=spoof))["headers"]["x-consumer-id"] == "bob"


def test_public_route_and_public_methods(gateway: GatewayProcess) -> None:
    ok(call(gateway, "/public/echo"))
    ok(call(gateway, "/public/echo", token=token(scope="read")))  # public: the scopes are not checked

    # Registration: POST is open, GET needs a token.
    ok(call(gateway, "/users/echo", method="POST"))
    response = call(gateway, "/users/echo")
    denied(response, 401, "unauthenticated")
    assert response.header_all("www-authenticate") == [BEARER_CHALLENGE]
    ok(call(gateway, "/users/echo", token=token()))
    denied(call(gateway, "/users/echo", method="DELETE"), 401, "unauthenticated")


# -- rights -------------------------------------------------------------------------------------------------
def test_scopes_all_and_any(gateway: GatewayProcess) -> None:
    both, read, other = token(scope="read write"), token(scp=["read"]), token(scope="other")
    ok(call(gateway, "/scopes-all/echo", token=both))
    ok(call(gateway, "/scopes-any/echo", token=both))
    denied(call(gateway, "/scopes-all/echo", token=read), 403, "insufficient_scope", read)
    ok(call(gateway, "/scopes-any/echo", token=read))
    denied(call(gateway, "/scopes-all/echo", token=other), 403, "insufficient_scope")
    denied(call(gateway, "/scopes-any/echo", token=other), 403, "insufficient_scope")
    denied(call(gateway, "/scopes-any/echo", token=token()), 403, "insufficient_scope")
    # Key scopes count too.
    ok(call(gateway, "/key-scopes/echo", key=ALICE_KEY))
    denied(call(gateway, "/key-scopes/echo", key=BOB_KEY), 403, "insufficient_scope", BOB_KEY)


def test_roles_any_and_all(gateway: GatewayProcess) -> None:
    editor, both = token(roles=["editor"]), token(roles=["admin", "editor", "x"])
    ok(call(gateway, "/roles-any/echo", token=editor))
    ok(call(gateway, "/roles-any/echo", token=both))
    ok(call(gateway, "/roles-all/echo", token=both))
    body = denied(call(gateway, "/roles-all/echo", token=editor), 403, "insufficient_role", editor)
    assert "admin" not in body["error"]  # what is missing is named only generically
    denied(call(gateway, "/roles-any/echo", token=token(roles=["viewer"])), 403, "insufficient_role")
    denied(call(gateway, "/roles-any/echo", token=token()), 403, "insufficient_role")


def test_groups_of_key_auth_consumers(gateway: GatewayProcess) -> None:
    ok(call(gateway, "/staff/echo", key=ALICE_KEY))
    denied(call(gateway, "/staff/echo", key=BOB_KEY), 403, "group_not_allowed", BOB_KEY)
    denied(call(gateway, "/staff/echo"), 401, "missing_key")  # key-auth is required there


def test_a_tenant_never_reaches_another_tenants_route(
    gateway: GatewayProcess, upstream: UpstreamServer
) -> None:
    marker = uuid.uuid4().hex
    denied(call(gateway, f"/tenant-b/echo/{marker}", key=ALICE_KEY), 403, "tenant_not_allowed", ALICE_KEY)
    denied(
        call(gateway, f"/tenant-b/echo/{marker}", token=token(tenant="tenant-a")), 403, "tenant_not_allowed"
    )
    denied(call(gateway, f"/tenant-b/echo/{marker}", token=token()), 403, "tenant_not_allowed")  # no tenant
    denied(call(gateway, f"/tenant-b/echo/{marker}"), 401, "unauthenticated")
    assert ok(call(gateway, "/tenant-b/echo", key=BOB_KEY))["headers"]["x-tenant-id"] == "tenant-b"
    ok(call(gateway, "/tenant-b/echo", token=token(tenant="tenant-b")))
    # The refused requests never reached the upstream (the accepted ones did).
    wait_until(lambda: sum(s.path == "/echo" for s in upstream.requests) >= 2, timeout=5)
    assert not [seen for seen in upstream.requests if marker in seen.path]


def test_claims(gateway: GatewayProcess) -> None:
    ok(call(gateway, "/claims/echo", token=token(email_verified=True, plan="pro")))
    ok(call(gateway, "/claims/echo", token=token(email_verified=True, plan="enterprise")))
    free = token(email_verified=True, plan="free")
    denied(call(gateway, "/claims/echo", token=free), 403, "claim_mismatch", free)
    denied(
        call(gateway, "/claims/echo", token=token(email_verified=False, plan="pro")), 403, "claim_mismatch"
    )
    denied(call(gateway, "/claims/echo", token=token(email_verified=1, plan="pro")), 403, "claim_mismatch")
    denied(call(gateway, "/claims/echo", token=token(plan="pro")), 403, "claim_mismatch")
    denied(
        call(gateway, "/claims/echo", token=token(email_verified=True, plan={"x": 1})), 403, "claim_mismatch"
    )
    ok(call(gateway, "/claims/echo", token=token(email_verified=True, plan=["basic", "pro"])))


# -- config -------------------------------------------------------------------------------------------------
def check(tmp_path: Path, routes: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "apigate.yaml"
    path.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "routes": routes}, sort_keys=False))
    return subprocess.run(
        apigate_cmd("check", "-c", str(path)), env=clean_env(), capture_output=True, text=True, timeout=60
    )


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    target = "http://127.0.0.1:9"
    result = check(
        tmp_path,
        [
            route("/a", target, {"authorize": {"scope": ["read"]}}),
            route("/b", target, {"authorize": {"scopes": ["read"], "scopes_mode": "some"}}),
            route("/c", target, {"authorize": {"roles_mode": "every"}}),
            route("/d", target, {"authorize": {"public_methods": ["GET POST"]}}),
            route("/e", target, {"authorize": {"claims": {"plan": []}}}),
            route("/f", target, {"key-auth": {"required": "perhaps"}}),
        ],
    )
    assert result.returncode == 1, result
    out = result.stderr
    assert "routes[0].policies.authorize.scope" in out
    assert "routes[1].policies.authorize.scopes_mode" in out
    assert "routes[2].policies.authorize.roles_mode" in out
    assert "routes[3].policies.authorize.public_methods" in out
    assert "routes[4].policies.authorize.claims" in out
    assert "routes[5].policies.key-auth.required" in out


def test_good_config_checks(tmp_path: Path) -> None:
    target = "http://127.0.0.1:9"
    result = check(
        tmp_path,
        [
            route(
                "/a",
                target,
                {
                    "key-auth": {"required": False},
                    "jwt": {**JWT, "required": False},
                    "authorize": {"public_methods": ["POST"], "tenants": ["t"], "claims": {"plan": "pro"}},
                },
            )
        ],
    )
    assert result.returncode == 0, result.stderr
