"""Front-door regressions: bytes smuggled behind an upgrade head, CONNECT, heads and chunk
framing that never end, trailers, and request bodies that trickle.

The upstream here is deliberately naive (Python's http.server with keep-alive): it ignores
Upgrade and reads whatever follows a request as the next request, as many real backends do.
So anything the gateway lets through unframed shows up in its record.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.naive_upstream import NaiveUpstream
from tests.support.proxy_http import RawConnection, rss_bytes, running_gateway

PLUGINS = ["tests.support.body_policies"]


@pytest.fixture(scope="module")
def gateway(naive: NaiveUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    target = f"http://127.0.0.1:{naive.port}"
    config = {
        "plugins": PLUGINS,
        "timeouts": {"body_idle": "1s"},
        "routes": [
            # A protected route: nothing reaches its upstream path without passing the policy.
            {
                "path": "/jwt/*",
                "target": target,
                "policies": {"request-termination": {"status": 401, "message": "no"}},
            },
            {"path": "/plain/*", "target": target, "upgrades": []},
            {"path": "/buffered", "timeout": "3s", "policies": {"test_body_digest": {}}},
            {"path": "/*", "target": target},
        ],
    }
    with running_gateway(tmp_path_factory.mktemp("front-door"), config) as gw:
        yield gw


@pytest.fixture
def fresh(naive: NaiveUpstream) -> NaiveUpstream:
    with naive.lock:
        naive.seen.clear()
    return naive


UPGRADE = b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
SMUGGLED = b"DELETE /jwt/admin/users/42 HTTP/1.1\r\nHost: t\r\nX-Consumer-ID: admin\r\n\r\n"


def test_bytes_after_an_upgrade_head_never_reach_an_upstream_that_did_not_switch(
    gateway: GatewayProcess, fresh: NaiveUpstream
) -> None:
    with RawConnection(gateway.port) as conn:
        conn.send(b"GET /public HTTP/1.1\r\nHost: t\r\n" + UPGRADE + b"\r\n" + SMUGGLED)
        response = conn.read_response()
        assert response.status == 200
        assert conn.closed_by_peer(), "without a 101 the connection ends: the rest is never read"
    fresh.wait_for(1)
    time.sleep(0.2)  # give a smuggled request the time to arrive, were it forwarded
    assert fresh.paths() == ["GET /public"]


def test_an_unfinished_body_behind_a_refused_upgrade_cannot_swallow_the_next_client(
    gateway: GatewayProcess, fresh: NaiveUpstream
) -> None:
    """The upstream connection of a refused upgrade is never pooled: the next client's request
    (with its credentials) cannot become the body of bytes an attacker left behind."""
    poison = b"POST /collect HTTP/1.1\r\nHost: t\r\nContent-Length: 400\r\n\r\nstolen="
    with RawConnection(gateway.port) as attacker:
        attacker.send(b"GET /public HTTP/1.1\r\nHost: t\r\n" + UPGRADE + b"\r\n" + poison)
        assert attacker.read_response().status == 200
    with RawConnection(gateway.port) as victim:
        response = victim.exchange("GET", "/account", {"Authorization": "Bearer victim-secret"})
        assert response.status == 200
    fresh.wait_for(2)
    assert fresh.paths() == ["GET /public", "GET /account"]
    assert fresh.seen[1][2]["authorization"] == "Bearer victim-secret"


def test_connect_is_refused_with_allow(gateway: GatewayProcess, fresh: NaiveUpstream) -> None:
    with RawConnection(gateway.port) as conn:
        conn.send(b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\nSSH-2.0-x\r\n")
        response = conn.read_response()
        assert response.status == 405
        assert "GET" in (response.header("allow") or "")
        assert conn.closed_by_peer()
    assert fresh.paths() == []


@pytest.mark.parametrize(
    "path, upgrade",
    [("/public", b"h2c"), ("/public", b"x-unknown/1.0"), ("/plain/ws", b"websocket")],
    ids=["h2c", "unknown", "websocket-not-allowed-on-route"],
)
def test_an_upgrade_the_route_does_not_allow_is_served_as_plain_http(
    gateway: GatewayProcess, fresh: NaiveUpstream, path: str, upgrade: bytes
) -> None:
    with RawConnection(gateway.port) as conn:
        conn.send(
            b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: %s\r\n"
            b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n" % (path.encode(), upgrade) + SMUGGLED
        )
        response = conn.read_response()
        assert response.status == 200  # never a 101
        assert conn.closed_by_peer()
    fresh.wait_for(1)
    time.sleep(0.2)
    assert fresh.paths() == [f"GET {path}"]
    headers = fresh.seen[0][2]
    assert "upgrade" not in headers and "http2-settings" not in headers


def test_an_upgrade_request_with_a_body_is_refused(gateway: GatewayProcess, fresh: NaiveUpstream) -> None:
    with RawConnection(gateway.port) as conn:
        conn.send(b"POST /public HTTP/1.1\r\nHost: t\r\n" + UPGRADE + b"Content-Length: 5\r\n\r\nhello")
        assert conn.read_response().status == 400
        assert conn.closed_by_peer()
    assert fresh.paths() == []


def test_a_header_line_that_never_ends_gets_431_at_once_with_memory_flat(gateway: GatewayProcess) -> None:
    assert gateway.proc is not None
    before = rss_bytes(gateway.proc.pid)
    with RawConnection(gateway.port) as conn:
        conn.send(b"GET /public HTTP/1.1\r\nHost: t\r\nX-Long: ")
        sent = 0
        chunk = b"a" * 65536
        try:
            while sent < 64 * 1024 * 1024:  # the gateway must answer long before this is sent
                conn.sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = conn.read_response()
        assert response.status == 431
    assert sent < 8 * 1024 * 1024, f"{sent} bytes were read before the 431"
    grown = rss_bytes(gateway.proc.pid) - before
    assert grown < 20 * 1024 * 1024, f"RSS grew by {grown} bytes"
    with RawConnection(gateway.port) as other:
        assert other.exchange("GET", "/health").status == 200


def test_a_chunk_extension_that_never_ends_is_refused(gateway: GatewayProcess, fresh: NaiveUpstream) -> None:
    with RawConnection(gateway.port) as conn:
        conn.send(b"POST /public HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=")
        try:
            for _ in range(64):
                conn.sock.sendall(b"x" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert conn.read_response().status == 400
        assert conn.closed_by_peer()


def test_trailer_fields_do_not_become_headers_of_the_next_request(
    gateway: GatewayProcess, fresh: NaiveUpstream
) -> None:
    with RawConnection(gateway.port) as conn:
        conn.send(
            b"POST /first HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Consumer-ID: admin\r\n\r\n"
            b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        assert conn.read_response().status == 200
        assert conn.read_response().status == 200
    fresh.wait_for(2)
    # An earlier test's refused upload may be recorded late, when its connection ends: only this
    # test's paths are compared, while no request at all may carry the trailer.
    assert [p for p in fresh.paths() if p.endswith(("/first", "/second"))] == ["POST /first", "GET /second"]
    assert all("x-consumer-id" not in headers for _, _, headers in fresh.seen)


def test_a_trickled_body_on_a_buffering_route_gets_408(gateway: GatewayProcess) -> None:
    """Silence between body bytes past timeouts.body_idle (1 s here) ends the exchange."""
    with RawConnection(gateway.port) as conn:
        conn.send(b"POST /buffered HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nab")
        started = time.monotonic()
        response = conn.read_response()
        assert response.status == 408
        assert 0.9 < time.monotonic() - started < 5
        assert conn.closed_by_peer()


def test_a_body_trickled_within_body_idle_still_ends_at_the_route_timeout(gateway: GatewayProcess) -> None:
    """One byte every 0.3 s never trips body_idle; the route's whole timeout (3 s) ends it."""
    with RawConnection(gateway.port) as conn:
        conn.send(b"POST /buffered HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
        started = time.monotonic()
        while time.monotonic() - started < 10:
            readable, _, _ = select.select([conn.sock], [], [], 0.3)
            if readable:
                break
            conn.send(b"x")
        assert conn.read_response().status == 408
        assert 2.5 < time.monotonic() - started < 6


def test_many_trickling_bodies_are_all_cut(gateway: GatewayProcess) -> None:
    conns = [socket.create_connection(("127.0.0.1", gateway.port), timeout=10) for _ in range(100)]
    try:
        for sock in conns:
            sock.sendall(b"POST /buffered HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\nx")
        for sock in conns:
            answer = b""
            while b"\r\n" not in answer:
                data = sock.recv(4096)
                assert data, "closed without an answer"
                answer += data
            assert answer.startswith(b"HTTP/1.1 408 ")
    finally:
        for sock in conns:
            sock.close()


def test_the_header_limit_still_holds_for_whole_lines(tmp_path: Path, naive: NaiveUpstream) -> None:
    """Heads that arrive line by line are still measured exactly (not only per read)."""
    target = f"http://127.0.0.1:{naive.port}"
    config = {"limits": {"max_header_bytes": "4KB"}, "routes": [{"path": "/*", "target": target}]}
    with running_gateway(tmp_path, config) as gw, RawConnection(gw.port) as conn:
        try:
            conn.send(b"GET / HTTP/1.1\r\nHost: t\r\n")
            for index in range(100):
                conn.send(b"X-H%d: %s\r\n" % (index, b"v" * 60))
            conn.send(b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert conn.read_response().status == 431
