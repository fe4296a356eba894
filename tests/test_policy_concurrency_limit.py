"""The `concurrency-limit` policy end to end: real gateway processes in front of a real upstream
whose /slow answers the test holds back, so "how many at once" is observed, never guessed."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from apigate.policies.concurrency_limit.slots import Slots
from tests.support.errors_helpers import Client, Response, apigate_cmd, wait_until
from tests.support.errors_helpers import request as send
from tests.support.exchanges import request_exchange
from tests.support.gateway import GatewayProcess
from tests.support.upstream import UpstreamServer

REPO = Path(__file__).resolve().parent.parent
PLUGIN_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
ALICE_KEY = "alice-concurrency-key-0123456789"
BOB_KEY = "bob-concurrency-key-0123456789ab"


def limited_route(
    target: str, limit: dict[str, Any], also: dict[str, Any] | None = None, **route: Any
) -> dict[str, Any]:
    """A config with one route /api/* to ``target``, limited by ``limit`` after the policies ``also``."""
    return {
        "routes": [
            {
                "path": "/api/*",
                "target": target,
                "strip_prefix": True,
                "policies": {**(also or {}), "concurrency-limit": limit},
                **route,
            }
        ]
    }


def at_once(
    pool: ThreadPoolExecutor, port: int, count: int, path: str, headers: list[tuple[str, str]] | None = None
) -> list[Future[Response]]:
    """``count`` requests sent together, each on a connection of its own."""
    return [pool.submit(send, port, "GET", path, headers, timeout=60) for _ in range(count)]


def answered(pending: list[Future[Response]]) -> list[Response]:
    return [future.result() for future in pending if future.done()]


def assert_refused(response: Response, retry_after: str = "1") -> None:
    assert response.status == 503, response
    assert response.header("retry-after") == retry_after
    body = response.json()
    assert body["reason"] == "concurrency_limited"
    assert body["request_id"] == response.header("x-request-id")
    assert body["error"]


def reset_on_close(client: Client) -> None:
    """Close as a client that went away does: a reset, not a polite half-close that still waits."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def fill_the_queue(port: int, places: int) -> list[Client]:
    """Send ``places`` + 1 requests while every slot is taken: all wait but one, refused at once.
    Returns the clients that wait."""
    clients = [Client(port, timeout=30) for _ in range(places + 1)]
    for client in clients:
        client.send_request("GET", "/api/slow/0")
    answering = wait_until(lambda: select.select([client.sock for client in clients], [], [], 0)[0])
    assert len(answering) == 1
    refused = next(client for client in clients if client.sock is answering[0])
    assert_refused(refused.read_response("GET"))
    refused.close()
    return [client for client in clients if client is not refused]


def test_fifty_at_once_against_ten_slots_and_ten_places_in_the_queue(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    gateway = start_gateway(limited_route(upstream.url, {"max": 10, "queue": 10, "queue_timeout": "30s"}))
    upstream.hold()
    with ThreadPoolExecutor(50) as pool:
        pending = at_once(pool, gateway.port, 50, "/api/slow/500")
        # 10 run and 10 wait; the other 30 are answered at once, while the upstream holds the 10.
        wait_until(lambda: len(answered(pending)) == 30 and upstream.in_flight == 10, timeout=20)
        refused = answered(pending)
        for response in refused:
            assert_refused(response)
        upstream.release()
        responses = [future.result(timeout=30) for future in pending]
    assert Counter(r.status for r in responses) == {200: 20, 503: 30}
    assert upstream.most_in_flight == 10
    assert len([seen for seen in upstream.requests if seen.path == "/slow/500"]) == 20
    # The slots all came back: the next ten run at once again.
    upstream.most_in_flight = 0
    upstream.hold()
    with ThreadPoolExecutor(10) as pool:
        pending = at_once(pool, gateway.port, 10, "/api/slow/0")
        wait_until(lambda: upstream.in_flight == 10, timeout=20)
        upstream.release()
        assert [future.result(timeout=30).status for future in pending] == [200] * 10


def test_slots_and_queue_places_come_back_when_clients_go_away(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    gateway = start_gateway(limited_route(upstream.url, {"max": 5, "queue": 5, "queue_timeout": "30s"}))
    upstream.hold()
    running = [Client(gateway.port, timeout=30) for _ in range(5)]
    for client in running:
        client.send_request("GET", "/api/slow/0")
    wait_until(lambda: upstream.in_flight == 5)
    # Five wait in the queue; the sixth finds it full and is refused at once.
    waiting = fill_the_queue(gateway.port, 5)
    # The waiting clients go away: their places in the queue free up (five wait again).
    for client in waiting:
        reset_on_close(client)
    waiting = fill_the_queue(gateway.port, 5)
    # Every waiting and every running client goes away mid-request.
    for client in waiting + running:
        reset_on_close(client)
    # The upstream still holds the five requests whose clients left; a queued request may have
    # taken a freed slot (and reached the upstream) before the gateway read its own client's reset.
    stale = upstream.in_flight
    assert 5 <= stale <= 10
    with ThreadPoolExecutor(11) as pool:
        pending = at_once(pool, gateway.port, 11, "/api/slow/0")
        # All five slots are free again (the upstream sees five new requests), and the queue has
        # its five places: exactly one of the eleven is refused.
        wait_until(lambda: upstream.in_flight == stale + 5 and len(answered(pending)) == 1, timeout=20)
        upstream.release()
        responses = [future.result(timeout=30) for future in pending]
    assert Counter(r.status for r in responses) == {200: 10, 503: 1}
    assert upstream.most_in_flight == stale + 5


def test_a_request_that_waits_longer_than_queue_timeout_is_refused_and_leaves_the_queue(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    limit = {"max": 1, "queue": 1, "queue_timeout": "300ms", "retry_after": 3}
    gateway = start_gateway(limited_route(upstream.url, limit))
    upstream.hold()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(send, gateway.port, "GET", "/api/slow/0", None, timeout=30)
        wait_until(lambda: upstream.in_flight == 1)
        for _ in range(2):  # the second waits as long too: the first waiter left the queue
            started = time.monotonic()
            response = send(gateway.port, "GET", "/api/echo")
            assert time.monotonic() - started >= 0.3
            assert_refused(response, retry_after="3")
        upstream.release()
        assert first.result(timeout=30).status == 200
    assert send(gateway.port, "GET", "/api/echo").status == 200


def test_the_slot_comes_back_however_the_exchange_ends(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    gateway = start_gateway(
        {
            "plugins": ["tests.support.body_policies"],
            "policies": {"concurrency-limit": {"max": 1}},  # on every route, one count per route
            "routes": [
                {"path": "/api/*", "target": upstream.url, "strip_prefix": True},
                {"path": "/dead/*", "target": "http://127.0.0.1:1", "retries": 0},
                {
                    "path": "/late/*",
                    "target": upstream.url,
                    "strip_prefix": True,
                    "policies": {"test_body_gate": {}},  # refuses after the limit let it in
                },
                {"path": "/timeout/*", "target": upstream.url, "strip_prefix": True, "timeout": "300ms"},
            ],
        },
        env=PLUGIN_ENV,
    )
    for _ in range(3):
        assert send(gateway.port, "GET", "/api/status/500").status == 500
        assert send(gateway.port, "GET", "/dead/x").status == 502
        assert send(gateway.port, "POST", "/late/echo", body=b"deny").status == 403
        assert send(gateway.port, "GET", "/api/echo").status == 200
    for _ in range(2):
        assert send(gateway.port, "GET", "/timeout/slow/3000").status == 504
    assert send(gateway.port, "GET", "/timeout/echo").status == 200
    assert send(gateway.port, "POST", "/late/echo", body=b"fine").status == 200


def test_per_consumer_counts_each_consumer_apart(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, tmp_path: Path
) -> None:
    gateway = start_gateway(
        {
            "store": {"url": f"sqlite:///{tmp_path / 'gateway.db'}"},
            "consumers": [
                {"id": "alice", "keys": [{"key": ALICE_KEY}]},
                {"id": "bob", "keys": [{"key": BOB_KEY}]},
            ],
            **limited_route(upstream.url, {"max": 2, "per": "consumer"}, also={"key-auth": {}}),
        }
    )
    alice = [("X-API-Key", ALICE_KEY)]
    bob = [("X-API-Key", BOB_KEY)]
    upstream.hold()
    with ThreadPoolExecutor(4) as pool:
        held = at_once(pool, gateway.port, 2, "/api/slow/0", alice)
        wait_until(lambda: upstream.in_flight == 2)
        assert_refused(send(gateway.port, "GET", "/api/echo", alice))
        held += at_once(pool, gateway.port, 2, "/api/slow/0", bob)  # bob's count is his own
        wait_until(lambda: upstream.in_flight == 4)
        assert_refused(send(gateway.port, "GET", "/api/echo", bob))
        assert send(gateway.port, "GET", "/api/echo").status == 401  # key-auth answers first
        upstream.release()
        assert [future.result(timeout=30).status for future in held] == [200] * 4


def test_per_upstream_shares_one_count_between_routes(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    gateway = start_gateway(
        {
            "upstreams": {"backend": {"targets": [upstream.url]}},
            "policies": {"concurrency-limit": {"max": 2, "per": "upstream"}},
            "routes": [
                {"path": "/a/*", "upstream": "backend", "strip_prefix": True},
                {"path": "/b/*", "upstream": "backend", "strip_prefix": True},
            ],
        }
    )
    upstream.hold()
    with ThreadPoolExecutor(2) as pool:
        held = [
            pool.submit(send, gateway.port, "GET", path, None, timeout=30)
            for path in ("/a/slow/0", "/b/slow/0")
        ]
        wait_until(lambda: upstream.in_flight == 2)
        assert_refused(send(gateway.port, "GET", "/a/echo"))
        assert_refused(send(gateway.port, "GET", "/b/echo"))
        upstream.release()
        assert [future.result(timeout=30).status for future in held] == [200, 200]


def test_a_freed_slot_goes_to_the_oldest_waiter_still_there_and_nothing_is_left_behind() -> None:
    slots = Slots(limit=1, queue=3)
    first, second, third, fourth = (request_exchange([(b"host", b"h")]) for _ in range(4))

    async def scenario() -> None:
        assert slots.take(first, "route")
        assert not slots.take(second, "route")
        turns = [slots.join_queue(exchange, "route") for exchange in (second, third, fourth)]
        assert all(turn is not None for turn in turns)
        assert slots.join_queue(request_exchange([(b"host", b"h")]), "route") is None  # queue full
        second_turn, third_turn, fourth_turn = turns
        slots.end(second)  # its client went away while it waited
        assert second_turn.result() is False
        slots.end(first)
        assert third_turn.result() is True and not fourth_turn.done()  # one wakes: the oldest
        slots.end(third)
        assert fourth_turn.result() is True
        slots.end(fourth)
        slots.end(fourth)  # an exchange ends once; a second call changes nothing
        assert (slots.running, slots.waiting, slots.holders) == ({}, {}, {})

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("limit", "field"),
    [
        ({"max": 0}, "max"),
        ({"max": 5, "per": "planet"}, "per"),
        ({"max": 5, "queue": -1}, "queue"),
        ({"max": 5, "queue_timeout": "0s"}, "queue_timeout"),
        ({"queue": 3}, "max"),
        ({"max": 5, "maximum": 6}, "maximum"),
    ],
)
def test_a_malformed_limit_is_refused_by_check_naming_the_field(
    tmp_path: Path, limit: dict[str, Any], field: str
) -> None:
    import yaml

    path = tmp_path / "apigate.yaml"
    config = limited_route("http://127.0.0.1:9", limit)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run(apigate_cmd("check", "-c", str(path)), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done.stdout
    assert f"routes[0].policies.concurrency-limit.{field}" in done.stderr + done.stdout
