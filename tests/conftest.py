"""Shared fixtures: real upstream servers and real gateway processes on free ports."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.dns_server import DnsServer
from tests.support.gateway import GatewayProcess
from tests.support.naive_upstream import NaiveUpstream
from tests.support.proxy_http import running_upstream
from tests.support.redis import RedisServer
from tests.support.redis_cluster import RedisClusterServers
from tests.support.redis_sentinel import RedisSentinelServers
from tests.support.state import Run
from tests.support.upstream import UpstreamServer

# Gateways started by tests run side by side: their admin listeners take a free port each unless
# a test names one (the default, 127.0.0.1:8001, would be taken by the first).
os.environ["APIGATE_ADMIN_LISTEN"] = "127.0.0.1:0"


@pytest.fixture
def run() -> Iterator[Run]:
    """Run a coroutine on this test's event loop: sync tests drive one loop, no asyncio plugin."""
    with asyncio.Runner() as runner:
        yield runner.run


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer().start()
    yield server
    server.stop()


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """A real DNS server on 127.0.0.1 (UDP and TCP, one free port) answering from a table the test sets."""
    server = DnsServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def naive() -> Iterator[NaiveUpstream]:
    """An upstream that ignores Upgrade and parses whatever follows a request as the next one."""
    server = NaiveUpstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[UpstreamServer]:
    """One upstream for a whole test module, for tests that do not count its connections."""
    with running_upstream() as server:
        yield server


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Call with a config dict (and optionally workers=, env=) to get a running gateway."""
    started: list[GatewayProcess] = []

    def start(config: dict, workers: int | None = None, env: dict | None = None) -> GatewayProcess:
        directory = tmp_path / f"gw{len(started)}"
        directory.mkdir()
        gateway = GatewayProcess(directory, config, workers=workers, env=env).start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server of this test session (each xdist worker has its own), on a free port."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A real 3-node Redis Cluster of this test session (each xdist worker has its own)."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterServers) -> str:
    """The session's Redis Cluster, emptied for this test."""
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
def redis_sentinel(tmp_path: Path) -> Iterator[RedisSentinelServers]:
    """A master, its replica and a sentinel watching them, for this test (a failover changes them)."""
    servers = RedisSentinelServers(tmp_path / "sentinel").start()
    yield servers
    servers.stop()


@pytest.fixture
def redis_sentinel_url(redis_sentinel: RedisSentinelServers) -> str:
    return redis_sentinel.url


@pytest.fixture(params=["redis", "cluster"])
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """The session's Redis, then its 3-node Redis Cluster: a test that must hold on both."""
    return request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url")
