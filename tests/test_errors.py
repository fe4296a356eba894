"""Errors end to end: every failure is a JSON {error, request_id} with the right status.

One gateway (started once for the module) carries a route per failure mode; tests that count
what the upstream received use paths of their own, so they do not see each other's requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.errors_helpers import (
    Blackhole,
    Client,
    ClosedPort,
    assert_error,
    get,
    request,
    wait_until,
)
from tests.support.gateway import GatewayProcess
from tests.support.upstream import UpstreamServer

MAX_BODY = 1000


@dataclass
class Env:
    gateway: GatewayProcess
    upstream: UpstreamServer
    pool_upstream: UpstreamServer
    blackhole_ready: bool

    @property
    def port(self) -> int:
        return self.gateway.port

    def upstream_paths(self) -> list[str]:
        return [seen.path for seen in self.upstream.requests]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    upstream = UpstreamServer().start()
    pool_upstream = UpstreamServer().start()
    closed = ClosedPort()  # held until the end, so the gateway cannot be given this port
    refused = closed.url
    blackhole = Blackhole()
    blackhole_ready = blackhole.fill()
    config = {
        "timeouts": {"connect": "500ms"},
        "limits": {"max_header_bytes": 2048},
        "upstreams": {
            "flaky": {"targets": [refused, upstream.url]},
            "tight": {"targets": [pool_upstream.url], "pool": {"max_connections": 1}},
        },
        "routes": [
            {"path": "/echo/*", "target": upstream.url, "max_body_size": MAX_BODY},
            {"path": "/methods", "target": upstream.url, "methods": ["GET", "POST"]},
            {"path": "/refused", "target": refused},
            {"path": "/noretry", "target": refused, "retries": 0},
            {"path": "/retry/*", "upstream": "flaky", "retries": 1},
            {"path": "/close/*", "target": upstream.url, "retries": 2},
            {"path": "/garbage", "target": upstream.url},
            {"path": "/delay/*", "target": upstream.url, "timeout": "300ms"},
            {"path": "/smuggle/*", "target": upstream.url, "timeout": "2s"},
            {"path": "/tight/*", "upstream": "tight", "strip_prefix": True, "retries": 0},
            {"path": "/blackhole", "target": blackhole.url, "retries": 0},
        ],
    }
    gateway = GatewayProcess(Path(tmp_path_factory.mktemp("errors")), config).start()
    yield Env(gateway, upstream, pool_upstream, blackhole_ready)
    gateway.stop()
    upstream.stop()
    pool_upstream.stop()
    blackhole.close()
    closed.close()


def stats(port: int) -> dict:
    response = get(port, "/stats")
    assert response.status == 200, response
    return response.json()


# --- routing errors ----------------------------------------------------------------------------


def test_no_route_is_404(env: Env) -> None:
    payload = assert_error(get(env.port, "/nowhere/at/all"), 404)
    assert "route" in payload["error"]


def test_client_request_id_is_kept_in_errors(env: Env) -> None:
    response = get(env.port, "/nowhere", headers={"X-Request-ID": "client-id-42"})
    assert assert_error(response, 404)["request_id"] == "client-id-42"


def test_method_not_allowed_is_405_with_allow(env: Env) -> None:
    response = request(env.port, "DELETE", "/methods")
    assert_error(response, 405)
    assert response.header("allow") == "GET, POST"
    assert get(env.port, "/methods").status == 200


# --- upstream failures -------------------------------------------------------------------------


def test_upstream_refused_is_502(env: Env) -> None:
    payload = assert_error(get(env.port, "/refused"), 502)
    assert "refused" in payload["error"]


def test_upstream_closing_without_answer_is_502(env: Env) -> None:
    assert_error(get(env.port, "/close/plain"), 502)


def test_upstream_garbage_is_502(env: Env) -> None:
    payload = assert_error(get(env.port, "/garbage"), 502)
    assert "invalid" in payload["error"]


def test_upstream_slower_than_route_timeout_is_504_and_gateway_goes_on(env: Env) -> None:
    with Client(env.port) as client:
        payload = assert_error(client.request("GET", "/delay/3000"), 504)
        assert "timed out" in payload["error"]
        # The same keep-alive connection, and a new one, are served afterwards.
        assert client.request("GET", "/echo/after-timeout").status == 200
    assert get(env.port, "/echo/after-timeout-2").status == 200


def test_connect_timeout_is_504(env: Env) -> None:
    if not env.blackhole_ready:
        pytest.skip("this kernel completed every handshake to a full backlog; no connect timeout to provoke")
    payload = assert_error(get(env.port, "/blackhole"), 504)
    assert "connect timed out" in payload["error"]


def test_pool_exhaustion_is_504_then_recovers(env: Env) -> None:
    """The only pooled connection is busy: a second request waits the connect timeout, then 504."""
    with Client(env.port) as slow:
        slow.send_request("GET", "/tight/delay/2000")
        wait_until(
            lambda: any(s.path == "/delay/2000" for s in env.pool_upstream.requests),
            message="the slow request to reach the upstream",
        )
        payload = assert_error(get(env.port, "/tight/echo/waiting"), 504)
        assert "connect timed out" in payload["error"]
        assert slow.read_response().status == 200
    assert get(env.port, "/tight/echo/after").status == 200
    assert [s.path for s in env.pool_upstream.requests] == ["/delay/2000", "/echo/after"]


# --- malformed requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /echo/x HTTP/1.1\r\nHost: a\r\nthis is not a header line\r\n\r\n",
        b"GET /echo/x HTTP/1.1\r\nHost: a\r\nBad Name: v\r\n\r\n",
    ],
    ids=["garbage", "no-colon", "space-in-name"],
)
def test_malformed_request_is_400_and_closed(env: Env, raw: bytes) -> None:
    with Client(env.port) as client:
        client.send(raw)
        assert_error(client.read_response(), 400)
        assert client.closed_by_peer()


def test_headers_too_large_is_431_and_closed(env: Env) -> None:
    with Client(env.port) as client:
        client.send_request("GET", "/echo/big-head", {"X-Big": "a" * 4096})
        response = client.read_response()
        assert_error(response, 431)
        assert client.closed_by_peer()
    assert "/echo/big-head" not in env.upstream_paths()


def test_headers_just_under_the_limit_pass(env: Env) -> None:
    assert get(env.port, "/echo/small-head", headers={"X-Big": "a" * 1024}).status == 200


def test_body_over_limit_by_content_length_is_413(env: Env) -> None:
    with Client(env.port) as client:
        # Only the head: the gateway answers from Content-Length alone, before any body.
        client.send_request("POST", "/echo/too-big", {"Content-Length": str(MAX_BODY + 1)})
        payload = assert_error(client.read_response(), 413)
        assert str(MAX_BODY) in payload["error"]
        assert client.closed_by_peer()
    assert "/echo/too-big" not in env.upstream_paths()


def test_body_at_limit_passes(env: Env) -> None:
    response = request(env.port, "POST", "/echo/fits", body=b"x" * MAX_BODY)
    assert response.status == 200
    assert response.json()["body_length"] == MAX_BODY


def test_chunked_body_over_limit_is_413_and_closed(env: Env) -> None:
    """Without a length up front, the limit is enforced as the chunks arrive."""
    piece = b"y" * (MAX_BODY + 500)
    with Client(env.port) as client:
        client.send_request("POST", "/echo/chunked-too-big", {"Transfer-Encoding": "chunked"})
        client.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        assert_error(client.read_response(), 413)
        assert client.closed_by_peer()
    assert "/echo/chunked-too-big" not in env.upstream_paths()


def test_chunked_body_under_limit_passes(env: Env) -> None:
    with Client(env.port) as client:
        client.send_request("POST", "/echo/chunked-ok", {"Transfer-Encoding": "chunked"})
        client.send(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        response = client.read_response()
    assert response.status == 200
    assert response.json()["body_length"] == 11


# --- request smuggling ----------------------------------------------------------------------------

SMUGGLED = b"GET /smuggle/inner HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize(
    ("name", "head", "body"),
    [
        pytest.param(name, head, body, id=name)
        for name, head, body in [
            ("cl-and-te", "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
            ("te-and-cl", "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", b"0\r\n\r\n"),
            ("two-lengths", "Content-Length: 4\r\nContent-Length: 45\r\n", b"abcd"),
            ("bad-chunk-size", "Transfer-Encoding: chunked\r\n", b"zz\r\n\r\n0\r\n\r\n"),
            ("chunked-not-last", "Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"),
        ]
    ],
)
def test_smuggling_is_refused_with_400(env: Env, name: str, head: str, body: bytes) -> None:
    outer = f"/smuggle/outer-{name}"
    with Client(env.port) as client:
        client.send(f"POST {outer} HTTP/1.1\r\nHost: a\r\n{head}\r\n".encode() + body + SMUGGLED)
        response = client.read_response("POST")
        assert_error(response, 400)
        assert client.closed_by_peer()
    # A request after it has gone through, so anything the gateway would forward has arrived.
    assert get(env.port, f"/smuggle/barrier-{name}").status == 200
    assert "/smuggle/inner" not in env.upstream_paths()
    assert outer not in env.upstream_paths()


# --- retries -----------------------------------------------------------------------------------------


def test_retry_moves_to_the_next_target(env: Env) -> None:
    """Smooth round robin starts at the first target (refused): the retry gets the second."""
    before = stats(env.port)["retries"]
    for index in range(4):
        response = get(env.port, f"/retry/{index}")
        assert response.status == 200, response
        assert response.json()["path"] == f"/retry/{index}"
    assert stats(env.port)["retries"] > before


def test_no_retries_and_refused_target_is_502(env: Env) -> None:
    before = stats(env.port)["retries"]
    assert_error(get(env.port, "/noretry"), 502)
    assert stats(env.port)["retries"] == before


def test_post_is_not_retried_after_it_was_sent(env: Env) -> None:
    """The upstream got the POST and closed without answering: repeating it could repeat a side effect."""
    assert_error(request(env.port, "POST", "/close/post-once", body=b'{"charge": 100}'), 502)
    assert env.upstream_paths().count("/close/post-once") == 1
    # The same route does retry an idempotent GET.
    assert_error(get(env.port, "/close/get-again"), 502)
    assert env.upstream_paths().count("/close/get-again") >= 2
