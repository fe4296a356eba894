"""What the gateway accepts at its front door: the client's Connection header, Host and the
absolute-form target, the request line (version, spacing), TRACE, the jwt NumericDate claims,
and who may read the /routes and /stats endpoints. Real gateway processes, a real upstream."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.jwks_server import HS_SECRET, claims, hs_sign
from tests.support.proxy_http import RawConnection, RawResponse, find_request, running_gateway
from tests.support.upstream import UpstreamServer

API_KEY = "front-door-key-0123456789"


@pytest.fixture(scope="module")
def gateway(shared_upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    directory = tmp_path_factory.mktemp("front_door")
    url = shared_upstream.url
    config = {
        "store": {"url": f"sqlite:///{directory / 'apigate.db'}"},
        "consumers": [{"id": "partner", "tenant": "partner-tenant", "keys": [{"key": API_KEY}]}],
        "routes": [
            {"path": "/keyed/*", "target": url, "policies": {"key-auth": {}}},
            {
                "path": "/jwt/*",
                "target": url,
                "policies": {
                    "jwt": {
                        "algorithms": ["HS256"],
                        "secret": HS_SECRET,
                        "forward_claims": {"sub": "X-User-ID"},
                    }
                },
            },
            {"path": "/traceable/*", "target": url, "methods": ["GET", "TRACE"]},
            {"path": "/named/*", "target": url, "host": "api.example", "preserve_host": True},
            {"path": "/*", "target": url},
        ],
    }
    with running_gateway(directory / "gw", config) as gw:
        yield gw


def send(port: int, raw: bytes) -> RawResponse:
    with RawConnection(port) as conn:
        conn.send(raw)
        return conn.read_response()


def refusal(port: int, raw: bytes) -> tuple[RawResponse, bool]:
    """The answer to ``raw`` and whether the gateway closed the connection after it."""
    with RawConnection(port) as conn:
        conn.send(raw)
        response = conn.read_response()
        return response, conn.closed_by_peer()


def request_id() -> str:
    return uuid.uuid4().hex


def forwarded(gateway, upstream: UpstreamServer, request_line: str, fields: str) -> Any:
    """Send ``request_line`` with ``fields`` (lines ending in CRLF) and a fresh X-Request-ID; the
    answer must be 200; returns what the upstream received."""
    rid = request_id()
    response = send(gateway.port, f"{request_line}\r\n{fields}X-Request-ID: {rid}\r\n\r\n".encode())
    assert response.status == 200, response
    return find_request(upstream, rid)


# -- the client's Connection header ----------------------------------------------------------------
def test_connection_header_cannot_strip_headers_the_gateway_sets(gateway, shared_upstream):
    seen = forwarded(
        gateway,
        shared_upstream,
        "GET /keyed/echo HTTP/1.1",
        f"Host: gw.test\r\nX-API-Key: {API_KEY}\r\nConnection: X-Consumer-ID, X-Tenant-ID\r\n",
    )
    assert seen.header("x-consumer-id") == "partner"
    assert seen.header("x-tenant-id") == "partner-tenant"

    token = hs_sign(claims(sub="alice"))
    seen = forwarded(
        gateway,
        shared_upstream,
        "GET /jwt/echo HTTP/1.1",
        f"Host: gw.test\r\nAuthorization: Bearer {token}\r\nConnection: keep-alive, X-User-ID\r\n"
        "X-User-ID: mallory\r\n",
    )
    assert [v for k, v in seen.headers if k == "x-user-id"] == ["alice"]


def test_connection_header_still_removes_the_clients_own_headers(gateway, shared_upstream):
    seen = forwarded(
        gateway,
        shared_upstream,
        "GET /echo HTTP/1.1",
        "Host: gw.test\r\nConnection: X-Foo\r\nX-Foo: 1\r\nX-Bar: 2\r\n",
    )
    assert seen.header("x-foo") is None
    assert seen.header("x-bar") == "2"


def test_connection_header_cannot_take_away_host_or_framing(gateway, shared_upstream):
    rid = request_id()
    body = b"0123456789" * 10
    raw = (
        f"POST /named/echo HTTP/1.1\r\nHost: api.example\r\nConnection: host, content-length\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-ID: {rid}\r\n\r\n"
    ).encode() + body
    with RawConnection(gateway.port) as conn:
        conn.send(raw)
        response = conn.read_response()
        assert response.status == 200, response
        view = response.json()
        assert view["body_length"] == len(body)
        assert conn.exchange("GET", "/echo").status == 200  # the connection is still in step
    seen = find_request(shared_upstream, rid)
    assert seen.header("host") == "api.example"
    assert seen.header("content-length") == str(len(body))
    assert seen.body_length == len(body)


# -- Host and the absolute-form target -------------------------------------------------------------
def test_missing_or_repeated_host_is_refused(gateway):
    response, closed = refusal(gateway.port, b"GET /echo HTTP/1.1\r\n\r\n")
    assert (response.status, closed) == (400, True), response
    assert "Host" in response.json()["error"]
    response, closed = refusal(gateway.port, b"GET /echo HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n")
    assert (response.status, closed) == (400, True), response
    response, closed = refusal(gateway.port, b"GET /echo HTTP/1.0\r\nHost: a.test\r\nHost: b.test\r\n\r\n")
    assert (response.status, closed) == (400, True), response
    response = send(gateway.port, b"GET /echo HTTP/1.0\r\n\r\n")  # HTTP/1.0 need not send Host
    assert response.status == 200, response


def test_absolute_form_authority_replaces_host(gateway, shared_upstream):
    # Routed by the authority: the route wants api.example.
    seen = forwarded(
        gateway, shared_upstream, "GET http://api.example/named/echo?x=1 HTTP/1.1", "Host: elsewhere.test\r\n"
    )
    assert seen.path == "/named/echo"
    assert seen.header("host") == "api.example"  # preserve_host sends the authority
    assert seen.header("x-forwarded-host") == "api.example"
    # HTTP/1.0 without Host: the authority is the host.
    response = send(gateway.port, b"GET http://api.example/named/echo HTTP/1.0\r\n\r\n")
    assert response.status == 200, response
    for target in (b"http://user@api.example/named/echo", b"http:///named/echo"):
        response, closed = refusal(gateway.port, b"GET %s HTTP/1.1\r\nHost: api.example\r\n\r\n" % target)
        assert (response.status, closed) == (400, True), (target, response)


# -- the request line ------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/3.0"])
def test_unsupported_versions_get_505(gateway, version):
    response, closed = refusal(gateway.port, b"GET /echo %s\r\nHost: gw.test\r\n\r\n" % version)
    assert (response.status, closed) == (505, True), response


@pytest.mark.parametrize("line", [b"GET  /echo HTTP/1.1", b"GET /echo  HTTP/1.1"])
def test_extra_spaces_in_the_request_line_are_refused(gateway, line):
    response, closed = refusal(gateway.port, line + b"\r\nHost: gw.test\r\n\r\n")
    assert (response.status, closed) == (400, True), response
    # After an answered request on the same connection too.
    with RawConnection(gateway.port) as conn:
        assert conn.exchange("GET", "/echo").status == 200
        conn.send(line + b"\r\nHost: gw.test\r\n\r\n")
        assert conn.read_response().status == 400
        assert conn.closed_by_peer()


def test_a_pipelined_unsupported_method_is_refused_in_its_turn(gateway):
    with RawConnection(gateway.port) as conn:
        slow = b"GET /delay/200 HTTP/1.1\r\nHost: gw.test\r\n\r\n"
        conn.send(slow + b"PROPFIND /echo HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        assert conn.read_response().status == 200
        response = conn.read_response()
        assert response.status == 501, response  # not routed to the upstream's /echo
        assert conn.closed_by_peer()


# -- TRACE -----------------------------------------------------------------------------------------
def test_trace_is_refused_unless_the_route_lists_it(gateway, shared_upstream):
    response = send(gateway.port, b"TRACE /echo HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    assert response.status == 405, response
    assert "TRACE" not in response.header("allow")
    assert "GET" in response.header("allow")
    assert (
        forwarded(gateway, shared_upstream, "TRACE /traceable/echo HTTP/1.1", "Host: gw.test\r\n").method
        == "TRACE"
    )


# -- jwt NumericDate claims ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exp": "{exp}"}, "invalid_exp"),
        ({"nbf": "{past}"}, "invalid_nbf"),
        ({"iat": "{past}"}, "invalid_iat"),
        ({"nbf": True}, "invalid_nbf"),
        ({"iat": False}, "invalid_iat"),
    ],
)
def test_jwt_dates_must_be_json_numbers(gateway, overrides, reason):
    numbers = claims(sub="alice")
    texts = {"{exp}": str(numbers["exp"]), "{past}": str(numbers["iat"] - 60)}
    token = hs_sign({**numbers, **{k: texts.get(v, v) for k, v in overrides.items()}})
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", "/jwt/echo", {"Authorization": f"Bearer {token}"})
    assert response.status == 401, response
    body = response.json()
    assert body["reason"] == reason
    assert reason.removeprefix("invalid_") in body["error"]
    with RawConnection(gateway.port) as conn:  # the same claims as numbers pass
        response = conn.exchange("GET", "/jwt/echo", {"Authorization": f"Bearer {hs_sign(numbers)}"})
    assert response.status == 200, response


# -- who may read /routes and /stats ---------------------------------------------------------------
def endpoints_gateway(directory, upstream: UpstreamServer, **config: Any) -> GatewayProcess:
    """A gateway on all loopback addresses, so that clients can connect from 127.0.0.2 as well."""
    full = {**config, "routes": [{"path": "/api/*", "target": upstream.url}]}
    directory.mkdir(parents=True, exist_ok=True)
    return GatewayProcess(directory, full).start()


def status_of(
    port: int, path: str, host: str = "127.0.0.1", source: str | None = None, headers: dict | None = None
) -> int:
    with RawConnection(port, host=host, source=source) as conn:
        return conn.exchange("GET", path, headers).status


def test_routes_and_stats_answer_only_loopback_and_trusted_proxies_by_default(tmp_path, upstream):
    """Without a token, the client address decides. A trusted proxy on loopback forwarding for
    an outside client stands in for a client from elsewhere (tests send on loopback only)."""
    gateway = endpoints_gateway(tmp_path, upstream, trusted_proxies=["127.0.0.1/32"])
    try:
        outside = {"X-Forwarded-For": "203.0.113.7"}
        for path in ("/routes", "/stats"):
            assert status_of(gateway.port, path) == 200
            assert status_of(gateway.port, path, source="127.0.0.2") == 200  # loopback, not trusted
            assert status_of(gateway.port, path, headers=outside) == 403
        assert status_of(gateway.port, "/health", headers=outside) == 200
        # A forwarded address that is itself a trusted proxy is allowed.
        assert status_of(gateway.port, "/routes", headers={"X-Forwarded-For": "127.0.0.1"}) == 200
    finally:
        gateway.stop()


def test_endpoints_allow_names_the_clients_that_may_read_them(tmp_path, upstream):
    gateway = endpoints_gateway(tmp_path, upstream, endpoints={"allow": ["127.0.0.1"]})
    try:
        assert status_of(gateway.port, "/stats") == 200
        assert status_of(gateway.port, "/stats", source="127.0.0.2") == 403
        assert status_of(gateway.port, "/routes", source="127.0.0.2") == 403
        assert status_of(gateway.port, "/health", source="127.0.0.2") == 200
    finally:
        gateway.stop()
    # With a token and no allow list, any address with the token may read them.
    tokened = endpoints_gateway(tmp_path / "token", upstream, endpoints={"token": "s3cret-endpoints"})
    try:
        assert status_of(tokened.port, "/stats", source="127.0.0.2") == 401
        bearer = {"Authorization": "Bearer s3cret-endpoints"}
        assert status_of(tokened.port, "/stats", source="127.0.0.2", headers=bearer) == 200
    finally:
        tokened.stop()
