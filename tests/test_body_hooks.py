"""The engine's body phase: policies that read (or replace) the whole request body before it goes on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from apigate.config.loader import ConfigError, load_config
from tests.support.proxy_http import RawConnection

REPO = Path(__file__).resolve().parent.parent
PLUGIN_ENV = {"PYTHONPATH": str(REPO)}
PLUGINS = ["tests.support.body_policies"]


@pytest.fixture
def gateway(start_gateway, upstream):
    config = {
        "plugins": PLUGINS,
        "routes": [
            {"path": "/digest", "policies": {"test_body_digest": None}},
            {"path": "/digest-small", "max_body_size": 1000, "policies": {"test_body_digest": None}},
            {
                "path": "/upper/*",
                "target": upstream.url,
                "rewrite": "/echo",
                "policies": {"test_body_upper": None, "test_body_gate": None},
            },
        ],
    }
    return start_gateway(config, env=PLUGIN_ENV)


def digest(body: bytes) -> dict:
    return {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_terminal_policy_answers_with_the_whole_body(gateway) -> None:
    body = bytes(range(256)) * 800  # 200 KiB, arrives in many reads
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("POST", "/digest", body=body)
        assert response.status == 200
        assert response.json() == digest(body)
        # keep-alive: a second request on the same connection, without a body
        response = conn.exchange("GET", "/digest")
        assert response.json() == digest(b"")


def test_chunked_body_is_buffered_without_its_framing(gateway) -> None:
    pieces = [b"a" * 1000, b"b" * 70_000, b"c"]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("POST", "/digest", {"Transfer-Encoding": "chunked"}, framed)
        assert response.json() == digest(b"".join(pieces))


def test_body_over_the_policy_limit_is_413(gateway) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("POST", "/digest", body=b"x" * (256 * 1024 + 1))
        assert response.status == 413
        assert "262144 bytes" in response.json()["error"]
        assert conn.closed_by_peer()


def test_chunked_body_over_the_route_limit_is_413(gateway) -> None:
    framed = b"".join(b"%x\r\n%s\r\n" % (600, b"y" * 600) for _ in range(2)) + b"0\r\n\r\n"
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("POST", "/digest-small", {"Transfer-Encoding": "chunked"}, framed)
        assert response.status == 413
        assert "1000" in response.json()["error"]


def test_expect_continue_is_answered_before_buffering(gateway) -> None:
    body = b"z" * 5000
    with RawConnection(gateway.port) as conn:
        conn.send(
            b"POST /digest HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
            % len(body)
        )
        assert conn.read_response().status == 100
        conn.send(body)
        final = conn.read_response("POST")
        assert final.status == 200
        assert final.json() == digest(body)


def test_replaced_body_reaches_the_upstream_with_its_own_length(gateway, upstream) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("POST", "/upper/x", body=b"hello grow")
        echoed = response.json()
        assert response.status == 200
        assert echoed["body_length"] == len(b"HELLO GROW-grown")
        assert echoed["body_sha256"] == hashlib.sha256(b"HELLO GROW-grown").hexdigest()
        # chunked in, Content-Length out
        framed = b"5\r\nabcde\r\n0\r\n\r\n"
        response = conn.exchange("PUT", "/upper/y", {"Transfer-Encoding": "chunked"}, framed)
        assert response.json()["body_length"] == 5
    seen = upstream.requests[-1]
    assert seen.header("content-length") == "5"
    assert seen.header("transfer-encoding") is None


def test_an_awaiting_body_hook_can_refuse(gateway, upstream) -> None:
    before = len(upstream.requests)
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("POST", "/upper/z", body=b"please deny this")
        assert response.status == 403
        assert response.json() == {"error": "denied by body"}
        assert conn.exchange("POST", "/upper/z", body=b"fine").status == 200
    assert len(upstream.requests) == before + 1


def test_pipelined_bodies_are_answered_in_order(gateway) -> None:
    bodies = [b"first", b"second" * 1000, b""]
    with RawConnection(gateway.port) as conn:
        conn.send(b"".join(conn.request("POST", "/digest", body=b) for b in bodies))
        for body in bodies:
            assert conn.read_response("POST").json() == digest(body)


def test_route_without_target_needs_a_policy_that_answers_itself() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(text="routes:\n  - path: /a\n    policies: {headers: {}}\n", environ={})
    assert "needs a target or an upstream" in str(caught.value)
    config = load_config(
        text=f"plugins: {PLUGINS}\nroutes:\n  - path: /a\n    policies: {{test_body_digest: {{}}}}\n",
        environ={},
    )
    assert config.routes[0].target is None


def test_a_plugin_that_cannot_be_imported_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(text="plugins: [no_such_module_here]\nroutes: []\n", environ={})
    assert "plugins[0]" in str(caught.value)
    assert "no_such_module_here" in str(caught.value)
