"""Idle connections are closed on both sides: pooled upstream ones and keep-alive client ones."""

from __future__ import annotations

import http.client
import socket
import time
from typing import Any

from tests.support.upstream import UpstreamServer


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_pooled_upstream_connection_is_closed_after_idle_timeout(
    start_gateway: Any, upstream: UpstreamServer
) -> None:
    gateway = start_gateway(
        {
            "upstreams": {"app": {"targets": [upstream.url], "pool": {"idle_timeout": "300ms"}}},
            "routes": [{"path": "/*", "upstream": "app"}],
        }
    )
    assert get(gateway.port, "/echo") == 200
    assert upstream.connections == 1
    wait_for(lambda: upstream.closed == 1)  # the gateway closed its idle pooled connection
    assert get(gateway.port, "/echo") == 200
    assert upstream.connections == 2


def test_pooled_connection_is_reused_within_idle_timeout(
    start_gateway: Any, upstream: UpstreamServer
) -> None:
    gateway = start_gateway(
        {
            "upstreams": {"app": {"targets": [upstream.url], "pool": {"idle_timeout": "60s"}}},
            "routes": [{"path": "/*", "upstream": "app"}],
        }
    )
    for _ in range(3):
        assert get(gateway.port, "/echo") == 200
    assert upstream.connections == 1
    assert upstream.closed == 0


def test_idle_keepalive_client_connection_is_closed(start_gateway: Any, upstream: UpstreamServer) -> None:
    gateway = start_gateway(
        {"timeouts": {"keepalive": "300ms"}, "routes": [{"path": "/*", "target": upstream.url}]}
    )
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        # Read until the gateway closes the idle connection (recv returns b"").
        while chunk := sock.recv(65536):
            received += chunk
        assert time.monotonic() - started < 9


def trickle_head(port: int, lines: list[bytes], pause: float) -> bytes:
    """Send a request head a line at a time, ``pause`` apart, as long as the gateway listens;
    then read what it answers until it closes or answers the whole request."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for line in lines:
            try:
                sock.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                break  # the gateway gave up on the head
            time.sleep(pause)
        received = b""
        while not received.endswith(b"}") and (chunk := sock.recv(65536)):
            received += chunk
        return received


def test_a_head_trickled_past_the_header_timeout_gets_408(
    start_gateway: Any, upstream: UpstreamServer
) -> None:
    """Slowloris: a byte now and then keeps a connection from looking idle, but the whole head
    must arrive within timeouts.header."""
    gateway = start_gateway(
        {"timeouts": {"header": "1s", "keepalive": "60s"}, "routes": [{"path": "/*", "target": upstream.url}]}
    )
    started = time.monotonic()
    head = [b"GET /echo HTTP/1.1\r\nHost: x\r\n"] + [b"X-Slow: %d\r\n" % i for i in range(100)] + [b"\r\n"]
    answer = trickle_head(gateway.port, head, 0.2)  # 20 s to send it all
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"connection: close" in answer.lower()
    assert time.monotonic() - started < 15
    assert get(gateway.port, "/echo") == 200  # other clients are served


def test_a_slow_head_within_the_header_timeout_is_served(
    start_gateway: Any, upstream: UpstreamServer
) -> None:
    gateway = start_gateway(
        {"timeouts": {"header": "10s"}, "routes": [{"path": "/*", "target": upstream.url}]}
    )
    head = [
        b"GET /echo HTTP/1.1\r\nHost: x\r\n",
        b"X-Slow: 1\r\n",
        b"X-Slow: 2\r\n",
        b"Connection: close\r\n\r\n",
    ]
    answer = trickle_head(gateway.port, head, 0.4)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
