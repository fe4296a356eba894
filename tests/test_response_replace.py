"""The engine's replaced responses and detached copies, with policies of the test's own on a
gateway in this process, real sockets and a real upstream: a response hook that answers instead
of an upstream 304 (its connection reused), of an upstream 503 with a body (that connection
closed), of a HEAD's answer and of the gateway's own 502; the replacement meeting the other
response hooks; one replacement per exchange; routes whose policies do not replace; and a copy
of a request sent upstream for no client."""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterator

import pytest

from tests.support.errors_helpers import wait_until
from tests.support.inprocess import InProcessGateway
from tests.support.proxy_http import RawConnection
from tests.support.replacing_policies import SEEN
from tests.support.upstream import UpstreamServer, made_body

_tags = itertools.count()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def gateway(shared_upstream: UpstreamServer) -> Iterator[InProcessGateway]:
    url = shared_upstream.url

    def route(path: str, policies: dict, target: str = url) -> dict:
        return {"path": f"/{path}/*", "target": target, "rewrite": "/made", "policies": policies}

    replace = {"test_response_replace": {"statuses": [304, 503, 200]}}
    config = {
        "plugins": ["tests.support.replacing_policies"],
        "routes": [
            route("replace", replace),
            # headers (order 5000) answers after the replacing hook (8000): it sees the replacement.
            route("edited", {**replace, "headers": {"response": {"set": {"X-Edited": "yes"}}}}),
            route("down", {"test_response_replace": {"errors": True}}, f"http://127.0.0.1:{_closed_port()}"),
            route("down-kept", {"test_response_replace": {}}, f"http://127.0.0.1:{_closed_port()}"),
            route("always", {"test_response_replace": {"always": True}}),
            route("ignored", {"test_response_ignored": {}}),
            route("copy", {"test_detached_copy": {}}),
        ],
    }
    with InProcessGateway(json.dumps(config)) as running:
        yield running


def made(route: str, **args: object) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"tag": next(_tags), **args}.items())
    return f"/{route}/x?{query}"


def upstream_seen(upstream: UpstreamServer, path: str) -> list:
    tag = path.partition("tag=")[2].partition("&")[0]
    return [seen for seen in list(upstream.requests) if f"tag={tag}" in seen.query.split("&")]


def test_an_upstream_304_is_replaced_and_its_connection_goes_back_to_the_pool(
    gateway: InProcessGateway, shared_upstream: UpstreamServer
) -> None:
    replaced = made("replace", status=304, h="etag:%22v1%22")
    passed = made("replace", size=100)
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", replaced)
        assert response.status == 200 and response.body == b"instead of 304"
        assert response.header("x-replaced") == "304" and response.header("content-length") == "14"
        assert response.header("etag") is None  # nothing of the upstream's response is sent
        again = conn.exchange("GET", passed)  # the client's connection carries on
        assert again.status == 200 and again.body == made_body(100)
    first, second = upstream_seen(shared_upstream, replaced)[0], upstream_seen(shared_upstream, passed)[0]
    assert first.connection_id == second.connection_id  # the 304 ended; its connection was reused


def test_an_upstream_answer_with_a_body_is_replaced_and_its_connection_closed(
    gateway: InProcessGateway, shared_upstream: UpstreamServer
) -> None:
    closed_before = shared_upstream.closed
    replaced = made("replace", status=503, size=300_000)
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", replaced)
        assert response.status == 200 and response.body == b"instead of 503"
        assert conn.exchange("GET", made("replace", size=10)).body == made_body(10)
    # The rest of the 503's body was not read: its connection went.
    assert wait_until(lambda: shared_upstream.closed > closed_before)


def test_a_head_answer_is_replaced_without_a_body(gateway: InProcessGateway) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("HEAD", made("replace", status=503))
        assert response.status == 200 and response.body == b""
        assert response.header("content-length") == "14" and response.header("x-replaced") == "503"
        assert conn.exchange("GET", made("replace", size=5)).body == made_body(5)


def test_the_other_response_hooks_see_the_replacement(gateway: InProcessGateway) -> None:
    response = RawConnection(gateway.port).exchange("GET", made("edited", status=304))
    assert response.status == 200 and response.header("x-replaced") == "304"
    assert response.header("x-edited") == "yes"
    plain = RawConnection(gateway.port).exchange("GET", made("edited", size=3))
    assert plain.body == made_body(3) and plain.header("x-edited") == "yes"


def test_the_gateways_own_error_is_replaced_when_the_upstream_cannot_be_reached(
    gateway: InProcessGateway,
) -> None:
    response = RawConnection(gateway.port).exchange("GET", made("down"))
    assert response.status == 200 and response.body == b"instead of connect_failed"
    assert response.header("x-replaced") == "connect_failed"
    kept = RawConnection(gateway.port).exchange("GET", made("down-kept"))
    assert kept.status == 502 and kept.json()["reason"] == "connect_failed"


def test_a_response_is_replaced_once(gateway: InProcessGateway) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", made("always", size=10))
        assert response.status == 299 and response.body == b"replaced again"
        assert conn.exchange("GET", made("always", status=304)).status == 299
    request_id = response.header("x-request-id")
    # The hook saw the upstream's 200, then its own replacement, whose Reply was not taken.
    assert [seen for name, rid, seen in SEEN if rid == request_id] == [(200, None), (299, None)]


def test_a_policy_that_does_not_replace_responses_is_not_listened_to(gateway: InProcessGateway) -> None:
    assert gateway.plan is not None
    routes = {route.path: route for route in gateway.plan.routes}
    assert routes["/replace/*"].response_replaces and routes["/edited/*"].response_replaces
    assert not routes["/ignored/*"].response_replaces and not routes["/copy/*"].response_replaces
    response = RawConnection(gateway.port).exchange("GET", made("ignored", size=20))
    assert response.status == 200 and response.body == made_body(20)


def test_a_detached_copy_goes_upstream_for_no_client(
    gateway: InProcessGateway, shared_upstream: UpstreamServer
) -> None:
    path = made("copy", size=50_000)
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", path, {"X-Detach": "1", "X-Request-ID": "original-1"})
        assert response.status == 202 and response.body == b""
        copy_id = response.header("x-copy")
        assert copy_id not in (None, "none", "original-1")
        assert conn.exchange("GET", made("copy", size=7)).body == made_body(7)  # nothing else came
    [seen] = wait_until(lambda: upstream_seen(shared_upstream, path) or None)
    assert seen.header("x-detached") == "1" and seen.header("x-detach") == "1"
    assert seen.header("x-request-id") == copy_id  # an id of its own
    logged = wait_until(lambda: [s for name, rid, s in SEEN if rid == copy_id] or None)
    # Its log hook ran with the state it was given, after the whole body went nowhere.
    assert logged == [("original-1", 200, 50_000, None)]
    # Its connection ended with it: the gateway keeps none but the clients'.
    assert wait_until(lambda: gateway.call(lambda gw: len(gw.connections)) == 0)


def test_no_copy_is_sent_while_the_gateway_drains(gateway: InProcessGateway) -> None:
    gateway.call(lambda gw: setattr(gw, "draining", True))
    try:
        response = RawConnection(gateway.port).exchange("GET", made("copy"), {"X-Detach": "1"})
    finally:
        gateway.call(lambda gw: setattr(gw, "draining", False))
    assert response.status == 202 and response.header("x-copy") == "none"
