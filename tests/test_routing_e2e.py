"""Routing through a real gateway process: path kinds, conditions, precedence, balancing, built-ins.

Each route tags its responses with ``X-Route: <name>`` (the headers policy), and the upstream
echoes the path it received, so a test sees both which route served and what went upstream.
Routes are declared least specific first, so precedence cannot come from declared order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.errors_helpers import (
    Client,
    Launched,
    Response,
    apigate_cmd,
    assert_error,
    clean_env,
    free_port,
    get,
    request,
)
from tests.support.gateway import GatewayProcess
from tests.support.pactown import PACTOWN_ROUTES_YAML
from tests.support.upstream import UpstreamServer

API_KEY = "key-value-123456"
UPSTREAM_TOKEN = "tok-value-abcdef"


def tagged(name: str, path: str, target: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "path": path,
        "target": target,
        "policies": {"headers": {"response": {"set": {"X-Route": name}}}},
        **extra,
    }


@dataclass
class Env:
    gateway: GatewayProcess
    upstream: UpstreamServer
    second: UpstreamServer

    @property
    def port(self) -> int:
        return self.gateway.port


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    upstream = UpstreamServer().start()
    second = UpstreamServer().start()
    url = upstream.url
    config = {
        "upstreams": {
            "weighted": {"targets": [{"url": url, "weight": 3}, {"url": second.url, "weight": 1}]},
        },
        "routes": [
            tagged("r-prefix", "/r/*", url),
            tagged("files", "/r/files/*", url, strip_prefix=True),
            tagged("files-deep", "/r/files/deep/*", url),
            tagged("user", "/r/users/{id}", url, rewrite="/echo/user/{id}"),
            tagged("users-me", "/r/users/me", url),
            tagged("order", "/r/users/{id}/orders/{oid}", url, rewrite="/echo/u/{id}/o/{oid}"),
            tagged("exact", "/r/exact", url),
            tagged("host-any", "/h", url),
            tagged("host-wild", "/h", url, host="*.example.com"),
            tagged("host-exact", "/h", url, host=["api.example.com"]),
            tagged("m-read", "/m", url, methods=["GET", "HEAD"]),
            tagged("m-write", "/m", url, methods=["POST", "PUT"]),
            tagged("hdr-none", "/v", url),
            tagged("hdr-beta", "/v", url, headers={"X-Beta": "*"}),
            tagged("hdr-v2", "/v", url, headers={"X-Version": "2"}),
            tagged("public", "/public/*", url),
            tagged("admin", "/admin", url),
            {"name": "weighted", "path": "/w/*", "upstream": "weighted"},
            tagged("counted", "/counted", url),
            tagged("health-user", "/health", url),
            {
                "name": "secretive",
                "path": "/secret-route",
                "target": url,
                "headers": {"X-Api-Key": API_KEY},
                "policies": {"headers": {"request": {"set": {"X-Upstream-Token": UPSTREAM_TOKEN}}}},
            },
            {
                "name": "unconfigured",
                "path": "/unconfigured",
                "target": url,
                "auth": "jwt",
                "rate_limit": "100/min",
                "cache": "60s",
            },
        ],
    }
    gateway = GatewayProcess(Path(tmp_path_factory.mktemp("routing")), config).start()
    yield Env(gateway, upstream, second)
    gateway.stop()
    upstream.stop()
    second.stop()


def served_by(response: Response) -> tuple[str | None, str]:
    """(route name, path the upstream received)."""
    assert response.status == 200, response
    return response.header("x-route"), response.json()["path"]


# --- path kinds and precedence ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "route", "upstream_path"),
    [
        ("/r/exact", "exact", "/r/exact"),
        ("/r/exact/more", "r-prefix", "/r/exact/more"),
        ("/r/users/me", "users-me", "/r/users/me"),
        ("/r/users/42", "user", "/echo/user/42"),
        ("/r/users/42/orders/7", "order", "/echo/u/42/o/7"),
        ("/r/users/42/orders", "r-prefix", "/r/users/42/orders"),
        ("/r/users", "r-prefix", "/r/users"),
        ("/r/files/a/b", "files", "/a/b"),
        ("/r/files", "files", "/"),
        ("/r/files/deep/x", "files-deep", "/r/files/deep/x"),
        ("/r/filesx", "r-prefix", "/r/filesx"),
        ("/r", "r-prefix", "/r"),
    ],
)
def test_path_kinds_and_precedence(env: Env, path: str, route: str, upstream_path: str) -> None:
    assert served_by(get(env.port, path)) == (route, upstream_path)


def test_query_string_is_forwarded(env: Env) -> None:
    response = get(env.port, "/r/users/42?expand=orders&x=1")
    assert served_by(response) == ("user", "/echo/user/42")
    assert response.json()["query"] == "expand=orders&x=1"


def test_outside_every_route_is_404(env: Env) -> None:
    assert_error(get(env.port, "/rr/exact"), 404)
    assert_error(get(env.port, "/"), 404)


# --- conditions -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "route"),
    [
        ("api.example.com", "host-exact"),
        ("API.Example.com:8443", "host-exact"),
        ("x.example.com", "host-wild"),
        ("a.b.example.com", "host-wild"),
        ("example.com", "host-any"),
        ("elsewhere.test", "host-any"),
    ],
)
def test_host_conditions(env: Env, host: str, route: str) -> None:
    assert served_by(get(env.port, "/h", host=host))[0] == route


def test_method_conditions(env: Env) -> None:
    assert served_by(get(env.port, "/m"))[0] == "m-read"
    assert served_by(request(env.port, "POST", "/m", body=b"{}"))[0] == "m-write"
    assert served_by(request(env.port, "PUT", "/m", body=b"{}"))[0] == "m-write"
    head = request(env.port, "HEAD", "/m")
    assert head.status == 200
    assert head.header("x-route") == "m-read"
    assert head.body == b""
    response = request(env.port, "DELETE", "/m")
    assert_error(response, 405)
    assert response.header("allow") == "GET, HEAD, POST, PUT"


@pytest.mark.parametrize(
    ("headers", "route"),
    [
        ({}, "hdr-none"),
        ({"X-Version": "2"}, "hdr-v2"),
        ({"X-Version": "3"}, "hdr-none"),
        ({"x-beta": ""}, "hdr-beta"),
        ({"X-Beta": "yes"}, "hdr-beta"),
        # Equally specific: declared order decides.
        ({"X-Beta": "yes", "X-Version": "2"}, "hdr-beta"),
    ],
)
def test_header_conditions(env: Env, headers: dict[str, str], route: str) -> None:
    assert served_by(get(env.port, "/v", headers=headers))[0] == route


@pytest.mark.parametrize(
    ("path", "route", "upstream_path"),
    [
        ("/public/docs", "public", "/public/docs"),
        ("/public/./docs", "public", "/public/docs"),
        ("/public/../admin", "admin", "/admin"),
        ("/public/%2e%2e/admin", "admin", "/admin"),
        ("/public/%2E%2E/admin", "admin", "/admin"),
        ("/public/x/../../admin", "admin", "/admin"),
        ("/public/../../../admin", "admin", "/admin"),
        ("//admin", "admin", "/admin"),
    ],
)
def test_dot_segments_are_resolved_before_routing(
    env: Env, path: str, route: str, upstream_path: str
) -> None:
    assert served_by(get(env.port, path)) == (route, upstream_path)


def test_dot_segments_escaping_public_to_nowhere_is_404(env: Env) -> None:
    assert_error(get(env.port, "/public/../etc/passwd"), 404)


# --- balancing ----------------------------------------------------------------------------------------


def test_weights_3_to_1_split_exactly(env: Env) -> None:
    """Smooth weighted round robin cycles A A B A: 400 requests give exactly 300 and 100."""
    with Client(env.port) as client:
        for index in range(400):
            response = client.request("GET", f"/w/{index}")
            assert response.status == 200, response
    first = [s.path for s in env.upstream.requests if s.path.startswith("/w/")]
    second = [s.path for s in env.second.requests if s.path.startswith("/w/")]
    assert (len(first), len(second)) == (300, 100)
    # Smooth: the light target is picked once in every cycle of four, never twice in a row.
    assert sorted(int(p.rsplit("/", 1)[1]) % 4 for p in second) == [2] * 100


# --- built-in endpoints ----------------------------------------------------------------------------------


def test_user_route_on_health_wins_over_builtin(env: Env) -> None:
    assert served_by(get(env.port, "/health")) == ("health-user", "/health")


def test_routes_lists_routes_with_secrets_masked_and_inactive_shorthands(env: Env) -> None:
    response = get(env.port, "/routes")
    assert response.status == 200
    assert API_KEY.encode() not in response.body
    assert UPSTREAM_TOKEN.encode() not in response.body
    routes = {item["name"]: item for item in response.json()["routes"]}
    assert len(routes) == 22
    assert routes["user"]["path"] == "/r/users/{id}"
    assert routes["user"]["rewrite"] == "/echo/user/{id}"
    secretive = routes["secretive"]
    assert secretive["headers"] == {"x-api-key": "***"}
    assert secretive["policies"]["headers"]["request"]["set"] == {"X-Upstream-Token": "***"}
    # rate_limit: 100/min is a rate-limit per client IP, cache: 60s a cache; jwt needs keys.
    assert routes["unconfigured"]["inactive"] == ["auth: jwt"]
    assert routes["unconfigured"]["policies"]["cache"]["ttl"] == 60.0
    assert routes["unconfigured"]["policies"]["rate-limit"]["limits"][0]["rate"] == "100/min"
    assert "inactive" not in routes["exact"]
    assert routes["exact"]["policies"]["headers"]["response"]["set"] == {"X-Route": "exact"}


def test_a_route_whose_auth_shorthand_is_not_active_refuses_requests(env: Env) -> None:
    before = len(env.upstream.requests)
    response = get(env.port, "/unconfigured")
    assert response.status == 503
    payload = response.json()
    assert payload["reason"] == "auth_not_configured"
    assert "auth: jwt" in payload["error"]
    assert payload["request_id"] == response.header("x-request-id")
    assert len(env.upstream.requests) == before


def test_secret_header_condition_still_routes(env: Env) -> None:
    response = get(env.port, "/secret-route", headers={"X-Api-Key": API_KEY})
    assert response.status == 200
    assert response.json()["headers"]["x-upstream-token"] == UPSTREAM_TOKEN
    assert_error(get(env.port, "/secret-route", headers={"X-Api-Key": "wrong"}), 404)


def test_stats_count_requests(env: Env) -> None:
    before = get(env.port, "/stats").json()
    for _ in range(5):
        assert get(env.port, "/counted").status == 200
    assert_error(get(env.port, "/not-routed-for-stats"), 404)
    after = get(env.port, "/stats").json()
    assert after["routes"]["counted"] - before["routes"].get("counted", 0) == 5
    assert after["requests_total"] - before["requests_total"] >= 6
    # (run first in its gateway, the test finds no response class counted yet)
    assert after["responses"]["2xx"] - before["responses"].get("2xx", 0) >= 5
    assert after["responses"]["4xx"] - before["responses"].get("4xx", 0) == 1
    assert after["errors"] - before["errors"] == 1
    assert after["uptime_seconds"] >= 0


def test_builtin_endpoints_with_token(start_gateway: Any, upstream: UpstreamServer) -> None:
    gateway = start_gateway(
        {"endpoints": {"token": "s3cret"}, "routes": [{"name": "x", "path": "/x", "target": upstream.url}]}
    )
    health = get(gateway.port, "/health")
    assert health.status == 200
    assert health.header("content-type") == "application/json"
    assert health.json() == {"status": "ok", "routes": 1}
    for path in ("/routes", "/stats"):
        for given in (None, "Bearer wrong", "Basic s3cret", "Bearer"):
            headers = {"Authorization": given} if given is not None else {}
            denied = get(gateway.port, path, headers=headers)
            assert_error(denied, 401)
            assert denied.header("www-authenticate") == 'Bearer realm="apigate"'
            assert b"s3cret" not in denied.body
        allowed = get(gateway.port, path, headers={"Authorization": "Bearer s3cret"})
        assert allowed.status == 200, allowed
    listed = get(gateway.port, "/routes", headers={"Authorization": "bearer s3cret"})
    assert [r["name"] for r in listed.json()["routes"]] == ["x"]
    assert b"s3cret" not in listed.body


# --- a routes.yaml written for the Pactown gateway -------------------------------------------------------


def test_pactown_routes_yaml_runs_unchanged_on_port_env(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(PACTOWN_ROUTES_YAML)
    port = free_port()
    process = Launched(
        apigate_cmd("run", "-c", "routes.yaml"), tmp_path, clean_env(PORT=str(port)), tmp_path / "log"
    )
    try:
        process.wait_listening(port)
        # No request goes to the file's hosts: resolving them would send DNS queries off this
        # machine. Unreachable targets are covered on loopback in test_errors.py.
        routes = get(port, "/routes").json()["routes"]
        assert [r["path"] for r in routes] == [
            "/webhooks/allegro",
            "/webhooks/inpost",
            "/webhooks/stripe",
            "/api/v1/*",
        ]
        assert routes[0]["inactive"] == ["auth: webhook_secret"]
        assert routes[0]["policies"]["rate-limit"]["key"] == ["ip"]
    finally:
        assert process.stop() == 0
    log = process.output()
    assert f":{port}" in log
    refused = "; its requests are refused (503) until then"
    for line in (
        "route /webhooks/allegro: auth: webhook_secret not active: set ALLEGRO_WEBHOOK_SECRET to the "
        "provider's signing secret" + refused,
        "route /webhooks/inpost: auth: hmac_sha256 not active: set INPOST_WEBHOOK_SECRET",
        "route /webhooks/stripe: auth: stripe_signature not active: set STRIPE_WEBHOOK_SECRET",
        "route /api/v1/*: auth: jwt not active: set JWT_SECRET or JWT_SECRET_KEY",
    ):
        assert log.count(line) == 1, log  # once, though the config is compiled again at start
