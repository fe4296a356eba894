"""The oauth2-introspection policy: end to end through a real gateway in front of a real upstream,
asking a fixture authorization server on a real socket; plus in-process tests of the policy
object for what needs a controlled clock or exact concurrency (cache expiry, one call shared by
concurrent requests)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from apigate.engine.exchange import Exchange
from apigate.engine.replies import Reply
from apigate.policies.registry import build_policy, validate_policy_config
from tests.support.errors_helpers import ClosedPort, Response, request
from tests.support.exchanges import request_exchange
from tests.support.gateway import GatewayProcess
from tests.support.oauth2_server import IntrospectionServer
from tests.support.proxy_http import find_request, running_gateway, running_upstream
from tests.support.upstream import UpstreamServer

INVALID = 'Bearer realm="apigate", error="invalid_token"'


@dataclass
class Env:
    gateway: GatewayProcess
    upstream: UpstreamServer
    server: IntrospectionServer


@pytest.fixture(scope="module")
def server() -> Iterator[IntrospectionServer]:
    authorization_server = IntrospectionServer().start()
    yield authorization_server
    authorization_server.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, server: IntrospectionServer) -> Iterator[Env]:
    directory = tmp_path_factory.mktemp("introspection")
    down = ClosedPort()
    with running_upstream() as upstream:
        target = upstream.url
        config = {
            "store": {"url": f"sqlite:///{directory / 'apigate.db'}"},
            "consumers": [{"id": "svc-billing", "tenant": "billing", "groups": ["finance"]}],
            "routes": [
                {
                    "path": "/api/*",
                    "target": target,
                    "policies": {
                        "oauth2-introspection": server.policy(
                            forward_claims={"sub": "X-User-ID", "scope": "X-Scopes"},
                            negative_cache_ttl="60s",
                        )
                    },
                },
                {
                    "path": "/orders/*",
                    "target": target,
                    "policies": {
                        "oauth2-introspection": server.policy(),
                        "authorize": {"scopes": ["orders:read"]},
                    },
                },
                {
                    "path": "/finance/*",
                    "target": target,
                    "policies": {
                        "oauth2-introspection": server.policy(),
                        "authorize": {"groups": ["finance"], "tenants": ["billing"]},
                    },
                },
                {
                    "path": "/down/*",
                    "target": target,
                    "policies": {
                        "oauth2-introspection": {**server.policy(), "introspection_url": down.url + "/x"}
                    },
                },
            ],
        }
        with running_gateway(directory / "gw", config) as gateway:
            yield Env(gateway, upstream, server)
    down.close()


def token() -> str:
    return "tok-" + uuid.uuid4().hex


def call(env: Env, path: str, authorization: str | None = None, headers: list | None = None) -> Response:
    pairs = list(headers or [])
    if authorization is not None:
        pairs.append(("Authorization", authorization))
    return request(env.gateway.port, "GET", path, pairs)


def refused(response: Response, status: int, reason: str) -> dict[str, Any]:
    assert response.status == status, response
    data = response.json()
    assert data["reason"] == reason, data
    assert set(data) == {"error", "reason", "request_id"}
    return data


# -- end to end ---------------------------------------------------------------------------------------------
def test_active_token_reaches_upstream_with_claims_and_the_client_authenticated(env: Env) -> None:
    bearer = env.server.active(token(), sub="alice", scope="orders:read profile")
    spoof = [("X-User-ID", "admin"), ("X-Scopes", "everything")]
    response = call(env, "/api/items", f"Bearer {bearer}", spoof)
    assert response.status == 200, response
    seen = find_request(env.upstream, response.header("x-request-id"))
    assert [v for k, v in seen.headers if k == "x-user-id"] == ["alice"]
    assert [v for k, v in seen.headers if k == "x-scopes"] == ["orders:read profile"]
    assert seen.header("authorization") == f"Bearer {bearer}"  # strip_credential is off
    form = next(f for f in env.server.forms if f["token"] == [bearer])
    assert form == {"token": [bearer], "token_type_hint": ["access_token"]}


def test_inactive_token_is_401_invalid_token_and_cached_briefly(env: Env) -> None:
    bearer = env.server.inactive(token())
    for _ in range(3):
        response = call(env, "/api/items", f"Bearer {bearer}")
        refused(response, 401, "token_inactive")
        assert response.header("www-authenticate") == INVALID
    assert env.server.calls_for(bearer) == 1  # the negative answer is reused


def test_unknown_token_is_inactive(env: Env) -> None:
    refused(call(env, "/api/items", f"Bearer {token()}"), 401, "token_inactive")


def test_expired_token_even_if_reported_active(env: Env) -> None:
    bearer = env.server.active(token(), exp=int(time.time()) - 5)
    refused(call(env, "/api/items", f"Bearer {bearer}"), 401, "token_expired")


def test_active_answer_is_cached(env: Env) -> None:
    bearer = env.server.active(token(), sub="bob")
    for _ in range(5):
        assert call(env, "/api/items", f"Bearer {bearer}").status == 200
    assert env.server.calls_for(bearer) == 1


def test_scopes_reach_authorize(env: Env) -> None:
    reader = env.server.active(token(), sub="carol", scope="orders:read")
    writer = env.server.active(token(), sub="dave", scope="orders:write")
    assert call(env, "/orders/1", f"Bearer {reader}").status == 200
    refused(call(env, "/orders/1", f"Bearer {writer}"), 403, "insufficient_scope")


def test_claims_name_a_registered_consumer(env: Env) -> None:
    # client_id names the consumer (a client-credentials token has no user): its groups and
    # tenant count, not the token's.
    service = env.server.active(token(), client_id="svc-billing", tenant="other")
    assert call(env, "/finance/report", f"Bearer {service}").status == 200
    stranger = env.server.active(token(), sub="mallory", groups=["finance"], tenant="billing")
    assert call(env, "/finance/report", f"Bearer {stranger}").status == 200  # claims alone suffice
    outsider = env.server.active(token(), sub="eve", tenant="billing")
    refused(call(env, "/finance/report", f"Bearer {outsider}"), 403, "group_not_allowed")


def test_authorization_server_down_is_503_not_401(env: Env) -> None:
    response = call(env, "/down/x", f"Bearer {token()}")
    data = refused(response, 503, "introspection_unavailable")
    assert "authorization server" in data["error"]
    assert response.header("retry-after") == "5"
    assert response.header("www-authenticate") is None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!", "introspection_failed"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{"sub": "x"}', "introspection_failed"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{"active": "yes"}', "introspection_failed"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n["active", 1]', "introspection_failed"),
        (
            b'HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n{"active": true, "exp": "soon"}',
            "introspection_failed",
        ),
        (b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", "introspection_unavailable"),
        (b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n", "introspection_failed"),
        (b"garbage\r\n\r\n", "introspection_unavailable"),
        (b"", "introspection_unavailable"),
    ],
    ids=[
        "not-json",
        "no-active",
        "active-string",
        "not-object",
        "exp-string",
        "500",
        "400",
        "garbage",
        "empty",
    ],
)
def test_malformed_authorization_server_answers_are_503(env: Env, raw: bytes, reason: str) -> None:
    bearer = env.server.raw(token(), raw)
    refused(call(env, "/api/items", f"Bearer {bearer}"), 503, reason)
    refused(call(env, "/api/items", f"Bearer {bearer}"), 503, reason)
    assert env.server.calls_for(bearer) == 2  # failures are never cached


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "missing_token"),
        ("Basic YWxpY2U6cHc=", "missing_token"),
        ("Bearer", "invalid_token"),
        ("Bearer    ", "invalid_token"),
        ("Bearer abc$def", "invalid_token"),
        ("Bearer a b", "invalid_token"),
        ("Bearer " + "a" * 5000, "token_too_large"),
    ],
    ids=["none", "basic", "no-token", "blank-token", "bad-char", "space", "huge"],
)
def test_bad_credentials_are_401(env: Env, authorization: str | None, reason: str) -> None:
    response = call(env, "/api/items", authorization)
    refused(response, 401, reason)
    assert (response.header("www-authenticate") or "").startswith('Bearer realm="apigate"')


def test_two_authorization_headers_are_refused(env: Env) -> None:
    bearer = env.server.active(token(), sub="alice")
    headers = [("Authorization", f"Bearer {bearer}")]
    refused(call(env, "/api/items", f"Bearer {bearer}", headers), 401, "invalid_token")


def test_non_ascii_authorization_header(env: Env) -> None:
    response = request(env.gateway.port, "GET", "/api/items", [("Authorization", "Bearer t\xe9st")])
    refused(response, 401, "invalid_token")


def test_huge_token_never_reaches_the_authorization_server(env: Env) -> None:
    huge = "h" * 100_000
    response = call(env, "/api/items", f"Bearer {huge}")
    assert response.status in (401, 431), response  # the gateway's head limit may answer first
    assert env.server.calls_for(huge) == 0


# -- the policy object ------------------------------------------------------------------------------------
async def decide(policy: Any, bearer: str) -> tuple[Reply | None, Exchange]:
    exchange = request_exchange([(b"authorization", f"Bearer {bearer}".encode())])
    result = policy.on_request(exchange)
    if result is not None and not isinstance(result, Reply):
        result = await result
    return result, exchange


def test_concurrent_requests_with_one_token_share_one_call(server: IntrospectionServer) -> None:
    bearer = server.active(token(), sub="zoe", scope="a b")
    policy = build_policy("oauth2-introspection", server.policy())
    server.delay = 0.3  # all ten are waiting while the first call is in flight
    try:
        results = asyncio.run(_gather(policy, bearer, 10))
    finally:
        server.delay = 0.0
    assert [reply for reply, _ in results] == [None] * 10
    assert server.calls_for(bearer) == 1
    exchange = results[0][1]
    assert exchange.consumer == "zoe"
    assert exchange.state is not None and exchange.state["scopes"] == frozenset({"a", "b"})


async def _gather(policy: Any, bearer: str, count: int) -> list[tuple[Reply | None, Exchange]]:
    return await asyncio.gather(*(decide(policy, bearer) for _ in range(count)))


def test_cache_holds_until_exp_capped_by_cache_ttl(server: IntrospectionServer) -> None:
    now = 1_900_000_000.0
    short = server.active(token(), exp=int(now) + 60)
    long = server.active(token(), exp=int(now) + 10_000)
    policy = build_policy("oauth2-introspection", server.policy(cache_ttl="5m", consumer_claims=[]))
    clock = [now]
    policy.introspector.clock = lambda: clock[0]

    async def main() -> None:
        for bearer in (short, long):
            assert (await decide(policy, bearer))[0] is None
        clock[0] = now + 61  # past short's exp: asked again, and now expired
        reply, _ = await decide(policy, short)
        assert reply is not None and json.loads(reply.body)["reason"] == "token_expired"
        assert (await decide(policy, long))[0] is None  # still cached
        clock[0] = now + 301  # past cache_ttl: asked again
        assert (await decide(policy, long))[0] is None

    asyncio.run(main())
    assert server.calls_for(short) == 2
    assert server.calls_for(long) == 2


def test_cache_is_bounded(server: IntrospectionServer) -> None:
    bearers = [server.active(token()) for _ in range(5)]
    policy = build_policy("oauth2-introspection", server.policy(cache_size=3, consumer_claims=[]))

    async def main() -> None:
        for bearer in bearers:
            assert (await decide(policy, bearer))[0] is None

    asyncio.run(main())
    assert set(policy.introspector.cache) == {b.encode() for b in bearers[-3:]}


# -- config ------------------------------------------------------------------------------------------------
BASE = {"introspection_url": "http://as/x", "client_id": "a", "client_secret": "x"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"introspection_url": None}, "introspection_url"),
        ({"introspection_url": "ftp://as/x"}, "introspection_url"),
        ({"introspection_url": "http://u:p@as/x"}, "introspection_url"),
        ({"client_id": None}, "client_id"),
        ({"client_id": ""}, "client_id"),
        ({"client_secret": None}, "client_secret"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": "soon"}, "timeout"),
        ({"header": "Host"}, "header"),
        ({"cache_size": -1}, "cache_size"),
        ({"token_type_hint": "a b"}, "token_type_hint"),
        ({"forward_claims": {"sub": "X-A", "email": "x-a"}}, "forward_claims"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_config_errors_name_the_field(change: dict[str, Any], field: str) -> None:
    config = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    issues = validate_policy_config("oauth2-introspection", config, ("policies", "oauth2-introspection"))
    assert issues, config
    assert issues[0].loc[2] == field, issues
    assert "p@" not in str(issues[0])


def test_routes_view_masks_the_client_secret(tmp_path: Path, server: IntrospectionServer) -> None:
    policy = build_policy("oauth2-introspection", server.policy())
    shown = json.dumps(policy.describe())
    assert "s3cret" not in shown
