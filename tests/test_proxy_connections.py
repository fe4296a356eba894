"""Client and upstream connection handling: keep-alive, pooling, pipelining, HTTP/1.0, upgrades."""

from __future__ import annotations

import http.client

import pytest
from websockets.sync.client import connect as ws_connect

from tests.support.proxy_http import (
    RawConnection,
    WebSocketEcho,
    find_request,
    running_gateway,
)


def proxy_config(upstream_url: str, **route: object) -> dict:
    return {"routes": [{"path": "/*", "target": upstream_url, **route}]}


@pytest.fixture(scope="module")
def gateway(shared_upstream, tmp_path_factory):
    """One gateway for the tests that do not count upstream connections."""
    with running_gateway(tmp_path_factory.mktemp("gw"), proxy_config(shared_upstream.url)) as gw:
        yield gw


# -- keep-alive and pooling -----------------------------------------------------------------------------


def test_client_keep_alive_serves_several_requests_on_one_socket(gateway):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    try:
        conn.request("GET", "/echo?n=0")
        first = conn.getresponse()
        assert first.status == 200
        first.read()
        sock = conn.sock
        assert sock is not None, "gateway closed a keep-alive connection"
        for n in range(1, 5):
            conn.request("POST" if n % 2 else "GET", f"/echo?n={n}", body=b"x" * n)
            response = conn.getresponse()
            payload = response.read()
            assert response.status == 200
            assert (response.getheader("connection") or "").lower() != "close"
            assert b'"query":"n=%d"' % n in payload
            assert conn.sock is sock, f"request {n} needed a new client connection"
    finally:
        conn.close()


def test_upstream_connection_is_pooled_across_client_connections(upstream, start_gateway):
    gw = start_gateway(proxy_config(upstream.url))
    for client in range(3):
        with RawConnection(gw.port) as conn:
            for n in range(3):
                response = conn.exchange("GET", f"/echo?client={client}&n={n}")
                assert response.status == 200
                assert response.json()["query"] == f"client={client}&n={n}"
    assert len(upstream.requests) == 9
    assert upstream.connections == 1
    assert {seen.connection_id for seen in upstream.requests} == {1}


def test_pooled_connection_also_carries_bodies_and_chunked_responses(upstream, start_gateway):
    gw = start_gateway(proxy_config(upstream.url))
    with RawConnection(gw.port) as conn:
        assert conn.exchange("POST", "/echo", body=b"a" * 5000).json()["body_length"] == 5000
        assert conn.exchange("GET", "/chunked/4").body == b"chunk-0\nchunk-1\nchunk-2\nchunk-3\n"
        assert conn.exchange("GET", "/status/404").status == 404
        assert conn.exchange("GET", "/echo").status == 200
    assert upstream.connections == 1


# -- pipelining -------------------------------------------------------------------------------------------


def test_pipelined_requests_are_answered_completely_and_in_order(gateway):
    # Earlier requests take longer upstream: answering out of order would show up at once.
    delays = [400, 200, 50, 0]
    with RawConnection(gateway.port) as conn:
        batch = b"".join(
            conn.request("GET", f"/delay/{ms}", {"X-Request-ID": f"pipe-{i}"}) for i, ms in enumerate(delays)
        )
        conn.send(batch)  # one write: the gateway parses all four before answering the first
        for i in range(len(delays)):
            response = conn.read_response()
            assert response.status == 200
            assert response.header("x-request-id") == f"pipe-{i}"
            assert response.body == b'{"delayed":true}'
        assert conn.exchange("GET", "/echo").status == 200  # still usable afterwards


def test_pipelined_post_with_body_between_gets(gateway, shared_upstream):
    body = bytes(range(256)) * 40
    with RawConnection(gateway.port) as conn:
        conn.send(
            conn.request("GET", "/delay/150?step=1", {"X-Request-ID": "pp-1"})
            + conn.request("POST", "/echo?step=2", {"X-Request-ID": "pp-2"}, body)
            + conn.request("GET", "/echo?step=3", {"X-Request-ID": "pp-3"})
        )
        first = conn.read_response()
        second = conn.read_response()
        third = conn.read_response()
    assert first.header("x-request-id") == "pp-1"
    assert first.body == b'{"delayed":true}'
    assert second.header("x-request-id") == "pp-2"
    assert second.json()["method"] == "POST"
    assert second.json()["query"] == "step=2"
    assert second.json()["body_length"] == len(body)
    import hashlib

    assert second.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert third.header("x-request-id") == "pp-3"
    assert third.json()["method"] == "GET"
    assert third.json()["query"] == "step=3"
    assert third.json()["body_length"] == 0
    assert find_request(shared_upstream, "pp-3").body_length == 0


def test_pipelined_requests_with_a_large_body_in_the_middle(gateway):
    body = b"B" * (1 << 20)  # more than the gateway buffers for a request waiting in line
    with RawConnection(gateway.port) as conn:
        conn.send(
            conn.request("GET", "/delay/100", {"X-Request-ID": "big-1"})
            + conn.request("PUT", "/echo", {"X-Request-ID": "big-2"}, body)
            + conn.request("GET", "/echo?after", {"X-Request-ID": "big-3"})
        )
        responses = [conn.read_response() for _ in range(3)]
    assert [r.header("x-request-id") for r in responses] == ["big-1", "big-2", "big-3"]
    assert responses[1].json()["body_length"] == len(body)
    assert responses[2].json()["query"] == "after"


def test_pipeline_mixing_gateway_answers_and_proxied_ones_keeps_order(gateway):
    """/health is answered by the gateway at once; it must still wait for the slow answer before it."""
    with RawConnection(gateway.port) as conn:
        conn.send(
            conn.request("GET", "/delay/300", {"X-Request-ID": "mix-1"})
            + conn.request("GET", "/health", {"X-Request-ID": "mix-2"})
            + conn.request("GET", "/echo?mix=3", {"X-Request-ID": "mix-3"})
            + conn.request("GET", "/health", {"X-Request-ID": "mix-4"})
        )
        responses = [conn.read_response() for _ in range(4)]
    assert [r.header("x-request-id") for r in responses] == ["mix-1", "mix-2", "mix-3", "mix-4"]
    assert responses[0].body == b'{"delayed":true}'
    assert responses[1].json()["status"] == "ok"
    assert responses[2].json()["query"] == "mix=3"
    assert responses[3].json()["status"] == "ok"


def test_pipelined_requests_split_at_odd_boundaries(gateway):
    with RawConnection(gateway.port) as conn:
        batch = b"".join(
            conn.request("POST", f"/echo?n={i}", {"X-Request-ID": f"split-{i}"}, b"%d" % i * (i + 1))
            for i in range(5)
        )
        for start in range(0, len(batch), 7):
            conn.send(batch[start : start + 7])
        for i in range(5):
            response = conn.read_response()
            assert response.header("x-request-id") == f"split-{i}"
            assert response.json()["body_length"] == i + 1


def test_http11_connection_close_is_honoured(gateway):
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", "/echo", {"Connection": "close"})
        assert response.status == 200
        assert (response.header("connection") or "").lower() == "close"
        assert conn.closed_by_peer()


# -- HTTP/1.0 clients -----------------------------------------------------------------------------------


def test_http10_without_keep_alive_is_answered_then_closed(gateway):
    with RawConnection(gateway.port) as conn:
        conn.send(b"GET /echo?v=10 HTTP/1.0\r\nHost: gateway.test\r\n\r\n")
        response = conn.read_response()
        assert response.status == 200
        assert response.json()["query"] == "v=10"
        assert int(response.header("content-length")) == len(response.body)
        assert conn.closed_by_peer(), "gateway kept an HTTP/1.0 connection open without keep-alive"


def test_http10_keep_alive_with_content_length_stays_open(gateway):
    with RawConnection(gateway.port) as conn:
        for n in range(3):
            conn.send(b"GET /echo?n=%d HTTP/1.0\r\nHost: gateway.test\r\nConnection: keep-alive\r\n\r\n" % n)
            response = conn.read_response()
            assert response.status == 200
            assert response.json()["query"] == f"n={n}"
            assert response.header("content-length") is not None
            assert (response.header("connection") or "").lower() == "keep-alive"
            assert response.header("transfer-encoding") is None
        assert conn.is_open()


@pytest.mark.parametrize("keep_alive", [False, True], ids=["plain", "keep-alive"])
def test_http10_client_gets_a_chunked_upstream_response_unframed_and_closed(gateway, keep_alive):
    extra = b"Connection: keep-alive\r\n" if keep_alive else b""
    with RawConnection(gateway.port) as conn:
        conn.send(b"GET /chunked/6 HTTP/1.0\r\nHost: gateway.test\r\n" + extra + b"\r\n")
        response = conn.read_head()
        assert response.status == 200
        assert response.header("transfer-encoding") is None
        assert response.header("content-length") is None
        body = conn.read_to_eof()  # the close is the only end an HTTP/1.0 client understands
    assert body == b"".join(b"chunk-%d\n" % i for i in range(6))


def test_http10_client_gets_a_close_delimited_upstream_response(gateway):
    with RawConnection(gateway.port) as conn:
        conn.send(b"GET /eof/70000 HTTP/1.0\r\nHost: gateway.test\r\nConnection: keep-alive\r\n\r\n")
        response = conn.read_head()
        assert response.status == 200
        assert response.header("transfer-encoding") is None
        assert conn.read_to_eof() == b"x" * 70000


# -- upgrades -------------------------------------------------------------------------------------------


def test_websocket_tunnel_echoes_both_ways_and_closes(start_gateway):
    with WebSocketEcho() as echo:
        gw = start_gateway({"routes": [{"path": "/ws/*", "target": f"http://127.0.0.1:{echo.port}"}]})
        with ws_connect(f"ws://127.0.0.1:{gw.port}/ws/chat?room=1", open_timeout=10, max_size=None) as ws:
            assert ws.recv(timeout=10) == "hello"  # server → client without a client message first
            ws.send("ping")
            assert ws.recv(timeout=10) == "ping"
            blob = bytes(range(256)) * 4096  # 1 MiB binary frame, several TCP reads each way
            ws.send(blob)
            assert ws.recv(timeout=10) == blob
            for i in range(20):
                ws.send(f"message {i}")
            assert [ws.recv(timeout=10) for _ in range(20)] == [f"message {i}" for i in range(20)]
            response_headers = ws.response.headers
            assert response_headers.get("x-request-id")
        assert echo.closed.wait(10), "the upstream never saw the websocket close"
    assert echo.close_codes == [1000]
    assert echo.paths == ["/ws/chat?room=1"]
    seen = echo.headers[0]
    assert seen["upgrade"].lower() == "websocket"
    assert "upgrade" in seen["connection"].lower()
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert "sec-websocket-key" in seen


def test_websocket_closed_by_the_server(start_gateway):
    """The upstream ends the session: the client sees the close frame through the tunnel."""
    from websockets.exceptions import ConnectionClosedOK

    with WebSocketEcho() as echo:
        gw = start_gateway({"routes": [{"path": "/*", "target": f"http://127.0.0.1:{echo.port}"}]})
        with ws_connect(f"ws://127.0.0.1:{gw.port}/", open_timeout=10) as ws:
            assert ws.recv(timeout=10) == "hello"
            echo._server.shutdown()  # closes open connections with 1001 going away
            with pytest.raises(ConnectionClosedOK):
                ws.recv(timeout=10)
            assert ws.close_code == 1001


def test_busy_websocket_outlives_the_route_timeout(start_gateway):
    """A route's timeout bounds waiting for an answer; a tunnel in use must not be cut by it."""
    import time

    with WebSocketEcho() as echo:
        gw = start_gateway(
            {"routes": [{"path": "/*", "target": f"http://127.0.0.1:{echo.port}", "timeout": "1s"}]}
        )
        with ws_connect(f"ws://127.0.0.1:{gw.port}/", open_timeout=10) as ws:
            assert ws.recv(timeout=10) == "hello"
            opened = time.monotonic()
            count = 0
            while time.monotonic() - opened < 2.5:  # well past the 1 s route timeout
                ws.send(f"m{count}")
                assert ws.recv(timeout=5) == f"m{count}"
                count += 1
                time.sleep(0.02)  # pacing only: the tunnel is never idle for long
            ws.send("last")
            assert ws.recv(timeout=5) == "last"


UPGRADE_HEADERS = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


@pytest.mark.parametrize("path, status", [("/echo", 200), ("/status/404", 404)])
def test_upstream_declining_an_upgrade_is_answered_to_the_client(upstream, start_gateway, path, status):
    gw = start_gateway(proxy_config(upstream.url))
    with RawConnection(gw.port) as conn:
        response = conn.exchange("GET", path, UPGRADE_HEADERS)
        assert response.status == status
        assert int(response.header("content-length")) == len(response.body)
        if status == 200:
            seen = response.json()["headers"]
            assert seen["upgrade"] == "websocket"  # the upgrade was offered to the upstream
        assert conn.closed_by_peer(), "after a refused upgrade the connection must not be reused"
    # A fresh client connection still works.
    with RawConnection(gw.port) as conn:
        assert conn.exchange("GET", "/status/201").status == 201
