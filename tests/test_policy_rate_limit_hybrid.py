"""`rate-limit` with `backend: hybrid` end to end: real gateway processes counting in memory and
merging through a real Redis (and a 3-node Redis Cluster), a Redis that goes away and comes back,
reloads and shutdown. The window is frozen (tests/support/frozen_clock.py); syncing runs on real
time."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
from redis.cluster import RedisCluster

from apigate.state.base import NAMESPACE
from apigate.state.calls import same_slot
from tests.support.errors_helpers import request as send
from tests.support.errors_helpers import wait_until
from tests.support.gateway import GatewayProcess
from tests.support.load import most_within
from tests.support.redis import RedisServer
from tests.support.upstream import UpstreamServer
from tests.test_policy_rate_limit import frozen, frozen_env

SYNC_MS = 50
# What a sync may take beyond its interval here (Redis's answer, a busy event loop, the client's
# view of when a request was admitted): D = sync_interval + this, in the README's bound.
ROUND_TRIP_ALLOWANCE_MS = 100


def hybrid(limit: int, **more: Any) -> dict[str, Any]:
    return {
        "backend": "hybrid",
        "sync_interval": f"{SYNC_MS}ms",
        "limits": [{"name": "l", "limit": limit, "window": "60s", "algorithm": "fixed_window"}],
        **more,
    }


def config(url: str, policy: dict[str, Any], upstream: UpstreamServer) -> dict[str, Any]:
    route = {"name": "api", "path": "/api/*", "target": upstream.url, "policies": {"rate-limit": policy}}
    return frozen({"state": {"url": url}, "routes": [route]})


def shared_count(url: str) -> int:
    """The window count Redis holds for the route's limit and this client (127.0.0.1)."""
    key = NAMESPACE + same_slot("api\x1frate-limit:l:fixed_window\x1f127.0.0.1", "rl")[0]
    port = int(url.split("://")[1].split(",")[0].split("/")[0].rsplit(":", 1)[1])
    client: Any = (
        RedisCluster(host="127.0.0.1", port=port)
        if url.startswith("redis+cluster")
        else redis_py.Redis(port=port)
    )
    with client:
        value = client.hget(key, "c")
    return int(value) if value is not None else 0


def hammer_each(ports: list[int], connections: int, per_connection: int) -> list[list[tuple[float, int]]]:
    """Each gateway gets ``connections`` keep-alive connections sending ``per_connection`` requests
    one after another, all gateways at once; for each gateway, when each answer came and its status."""
    answers: list[list[tuple[float, int]]] = [[] for _ in ports]

    async def connection(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[index])
        request = b"GET /api/x HTTP/1.1\r\nHost: gateway.test\r\n\r\n"
        try:
            for _ in range(per_connection):
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                answers[index].append((time.monotonic(), int(head.split(b" ", 2)[1])))
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
        finally:
            writer.close()

    async def run() -> None:
        every = [connection(n % len(ports)) for n in range(connections * len(ports))]
        await asyncio.wait_for(asyncio.gather(*every), timeout=120)

    asyncio.run(run())
    return answers


# -- several processes ------------------------------------------------------------------------------
@pytest.mark.parametrize("redis", ["redis", "cluster"])
def test_two_gateways_admit_the_limit_within_the_bound_and_then_both_refuse(
    redis: str,
    start_gateway: Callable[..., GatewayProcess],
    upstream: UpstreamServer,
    request: pytest.FixtureRequest,
) -> None:
    """README's bound, measured: over the limit, at most what the other process admitted within
    2D (D = sync_interval + round trip); never under the limit; then the count in Redis is
    exactly what was admitted, and both gateways refuse."""
    url = request.getfixturevalue("redis_url" if redis == "redis" else "redis_cluster_url")
    limit = 3000
    gateways = [
        start_gateway(config(url, hybrid(limit), upstream), env=frozen_env()),
        start_gateway(config(url, hybrid(limit), upstream), env=frozen_env()),
    ]
    routes = send(gateways[0].port, "GET", "/routes").json()["routes"]
    assert routes[0]["policies"]["rate-limit"]["counters"] == f"hybrid (Redis every {SYNC_MS}ms)"

    answers = hammer_each([gateway.port for gateway in gateways], connections=2, per_connection=2000)
    admitted = [[at for at, status in seen if status == 200] for seen in answers]
    assert {status for seen in answers for _, status in seen} == {200, 429}
    each = [len(times) for times in admitted]
    total = sum(each)
    assert all(count <= limit for count in each), each  # a process never admits more than it sees
    assert total >= limit, each  # never under the limit
    span_ms = 2 * (SYNC_MS + ROUND_TRIP_ALLOWANCE_MS)
    unseen = [min(limit, most_within([round(at * 1000) for at in times], span_ms)) for times in admitted]
    assert total <= limit + max(unseen), (each, unseen)  # two processes: the other one's
    assert total < 2 * limit, each  # the syncs did stop them (each alone would admit the limit)

    wait_until(lambda: shared_count(url) == total, timeout=10)
    for gateway in gateways:
        assert send(gateway.port, "GET", "/api/x").status == 429
    assert len(upstream.requests) == total


def test_with_the_memory_state_backend_hybrid_counts_in_each_process_and_says_so(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    gateway = start_gateway(config("memory://", hybrid(3), upstream), env=frozen_env())
    assert [send(gateway.port, "GET", "/api/x").status for _ in range(4)] == [200, 200, 200, 429]
    wait_until(lambda: "(backend: hybrid): the state backend is not shared" in gateway.output())
    gateway.signal(signal.SIGHUP)  # recompiled with the state backend running: /routes knows too
    wait_until(lambda: "reloaded config" in gateway.output())
    routes = send(gateway.port, "GET", "/routes").json()["routes"]
    assert routes[0]["policies"]["rate-limit"]["counters"] == "this process"
    assert send(gateway.port, "GET", "/api/x").status == 429  # the reload kept the count


# -- Redis lost and back, reloads, shutdown --------------------------------------------------------
def test_deltas_made_while_redis_is_down_reach_it_when_it_returns(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        gateway = start_gateway(config(server.url, hybrid(10), upstream), env=frozen_env())
        assert [send(gateway.port, "GET", "/api/x").status for _ in range(4)] == [200] * 4
        wait_until(lambda: shared_count(server.url) == 4)
        server.stop()
        # The process goes on deciding from its view: 6 more fit, then it refuses.
        during = [send(gateway.port, "GET", "/api/x").status for _ in range(8)]
        assert during == [200] * 6 + [429] * 2
        wait_until(lambda: "rate-limit (backend: hybrid): Redis at" in gateway.output())

        server.start()  # empty: the 4 it had are gone; the 6 kept here are sent
        wait_until(lambda: shared_count(server.url) == 6)
        wait_until(lambda: "Redis answers again" in gateway.output())
        assert gateway.output().count("rate-limit (backend: hybrid): Redis at") == 1  # once per outage
        # The view follows Redis (6): 4 more fit once the answer is in.
        wait_until(lambda: send(gateway.port, "GET", "/api/x").status == 200)
        assert [send(gateway.port, "GET", "/api/x").status for _ in range(4)] == [200, 200, 200, 429]
    finally:
        server.stop()


def test_a_reload_keeps_count_and_deltas_and_shutdown_sends_the_last(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, redis_url: str
) -> None:
    slow = hybrid(8, sync_interval="60s")  # nothing is sent on its own during the test
    gateway = start_gateway(config(redis_url, slow, upstream), env=frozen_env())
    assert [send(gateway.port, "GET", "/api/x").status for _ in range(5)] == [200] * 5
    wait_until(lambda: shared_count(redis_url) == 1)  # the first sync, at the first request

    gateway.write_config(config(redis_url, {**slow, "headers": ["x-ratelimit"]}, upstream))
    gateway.signal(signal.SIGHUP)
    wait_until(lambda: "reloaded config" in gateway.output())
    # The same limit: the count goes on (5 of 8 spent), with the new fields.
    answer = send(gateway.port, "GET", "/api/x")
    assert (answer.status, answer.header("x-ratelimit-remaining"), answer.header("ratelimit")) == (
        200,
        "2",
        None,
    )
    assert [send(gateway.port, "GET", "/api/x").status for _ in range(3)] == [200, 200, 429]
    assert shared_count(redis_url) == 1

    assert gateway.stop() == 0  # draining sends what it still held
    assert shared_count(redis_url) == 8
