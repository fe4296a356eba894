"""Upstream targets from DNS and from registrations, through a real gateway: a test DNS server
changes its answers and the traffic follows; services register over the admin API (and in Redis),
heartbeat, stop, and leave; a registration outside the allowed networks is refused."""

from __future__ import annotations

import collections
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from tests.support.dns_server import DnsServer
from tests.support.errors_helpers import Client, request, wait_until
from tests.support.faulty_upstream import FaultyUpstream
from tests.support.gateway import GatewayProcess, free_port

TOKEN = "discovery-admin-token"


def served(port: int, count: int, path: str = "/x") -> collections.Counter[str]:
    found: collections.Counter[str] = collections.Counter()
    with Client(port) as client:
        for _ in range(count):
            response = client.request("GET", path)
            found[response.json()["target"] if response.status == 200 else str(response.status)] += 1
    return found


def admin(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = orjson.dumps(body) if body is not None else b""
    headers = [("Authorization", f"Bearer {TOKEN}"), ("Content-Type", "application/json")]
    response = request(port, method, path, headers=headers, body=data, host="127.0.0.1")
    return response.status, orjson.loads(response.body) if response.body else None


def dns_gateway(tmp_path: Path, dns_server: DnsServer, dns: dict[str, Any]) -> GatewayProcess:
    """A gateway whose one upstream takes its targets from ``dns``, asked of the test's server."""
    dns = {**dns, "nameservers": [f"127.0.0.1:{dns_server.port}"]}
    config = {
        "admin": None,
        "upstreams": {"api": {"dns": dns}},
        "routes": [{"path": "/*", "upstream": "api"}],
    }
    return GatewayProcess(tmp_path, config).start()


@pytest.fixture
def pair() -> Iterator[tuple[FaultyUpstream, FaultyUpstream]]:
    """Two targets on one port of two loopback addresses (as two hosts behind one DNS name)."""
    first = FaultyUpstream("first", host="127.0.0.2").start()
    second = FaultyUpstream("second", port=first.port, host="127.0.0.3").start()
    yield first, second
    first.close()
    second.close()


def test_targets_follow_dns_answers_within_the_ttl(
    tmp_path: Path, dns_server: DnsServer, pair: tuple[FaultyUpstream, FaultyUpstream]
) -> None:
    first = pair[0]
    dns_server.set("api.test.", "A", ["127.0.0.2"], ttl=1)
    dns = {"name": "api.test.", "port": first.port, "min_ttl": "200ms"}
    gateway = dns_gateway(tmp_path, dns_server, dns)
    try:
        wait_until(lambda: served(gateway.port, 1) == {"first": 1}, timeout=10, message="first answer used")
        dns_server.set("api.test.", "A", ["127.0.0.3"], ttl=1)
        changed = time.monotonic()
        wait_until(lambda: served(gateway.port, 1) == {"second": 1}, timeout=10, message="new answer used")
        assert time.monotonic() - changed < 1 + 1.5  # the TTL, and a resolution's and a reload's time
        assert served(gateway.port, 10) == {"second": 10}
        dns_server.set("api.test.", "A", ["127.0.0.2", "127.0.0.3"], ttl=1)
        wait_until(lambda: len(served(gateway.port, 4)) == 2, timeout=10, message="both addresses used")
        # A failing DNS server keeps the last good set.
        dns_server.fail("api.test.", "SERVFAIL")
        time.sleep(1.5)
        assert served(gateway.port, 10) == {"first": 5, "second": 5}
        assert "DNS A query for api.test." in gateway.output()
    finally:
        gateway.stop()


def test_srv_records_give_ports_and_weights(tmp_path: Path, dns_server: DnsServer) -> None:
    light = FaultyUpstream("light").start()
    heavy = FaultyUpstream("heavy").start()
    try:
        dns_server.set("t1.test.", "A", ["127.0.0.1"], ttl=30)
        dns_server.set_srv(
            "_http._tcp.api.test.", [(10, 1, light.port, "t1.test."), (10, 3, heavy.port, "t1.test.")]
        )
        gateway = dns_gateway(tmp_path, dns_server, {"name": "_http._tcp.api.test.", "record": "SRV"})
        try:
            wait_until(lambda: "503" not in served(gateway.port, 1), timeout=10, message="targets discovered")
            assert served(gateway.port, 40) == {"light": 10, "heavy": 30}
        finally:
            gateway.stop()
    finally:
        light.close()
        heavy.close()


@pytest.fixture
def registered_gateway(tmp_path: Path) -> Iterator[tuple[GatewayProcess, int]]:
    admin_port = free_port()
    config = {
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": TOKEN},
        "discovery": {"allowed_networks": ["127.0.0.0/8"]},
        "upstreams": {"users": {"service": "user-service"}},
        "routes": [{"path": "/*", "upstream": "users", "retries": 0}],
    }
    gateway = GatewayProcess(tmp_path, config, workers=2).start()
    wait_until(lambda: _linked(admin_port), timeout=15, message="both workers linked")
    yield gateway, admin_port
    gateway.stop()


def _linked(port: int) -> bool:
    try:
        status, body = admin(port, "GET", "/api/services")
    except OSError:
        return False
    return status == 200 and body["workers"] == 2


def test_a_service_registers_heartbeats_and_leaves_after_its_ttl(
    registered_gateway: tuple[GatewayProcess, int],
) -> None:
    gateway, port = registered_gateway
    assert served(gateway.port, 1) == {"503": 1}  # nothing registered: no target
    assert request(gateway.port, "GET", "/x").json()["reason"] == "no_healthy_upstream"
    target = FaultyUpstream("user-1").start()
    try:
        registration = {
            "id": "user-1",
            "name": "user-service",
            "host": "127.0.0.1",
            "port": target.port,
            "ttl": 1.5,
        }
        status, body = admin(port, "POST", "/api/services", registration)
        assert status == 201 and body["id"] == "user-1" and body["address"] == "127.0.0.1"
        wait_until(
            lambda: served(gateway.port, 4) == {"user-1": 4}, timeout=10, message="both workers use it"
        )
        status, body = admin(port, "GET", "/api/services")
        assert [r["id"] for r in body["registered"]] == ["user-1"]
        # Heartbeats keep it past its ttl...
        for _ in range(4):
            time.sleep(0.5)
            assert admin(port, "PUT", "/api/services/user-1/heartbeat")[0] == 200
        assert served(gateway.port, 4) == {"user-1": 4}
        # ...and without them it leaves.
        stopped = time.monotonic()
        wait_until(lambda: served(gateway.port, 2) == {"503": 2}, timeout=10, message="the entry expired")
        assert time.monotonic() - stopped < 1.5 + 2.0
        assert admin(port, "PUT", "/api/services/user-1/heartbeat")[0] == 404
        # Register, then deregister.
        assert admin(port, "POST", "/api/services", registration)[0] == 201
        wait_until(lambda: served(gateway.port, 2) == {"user-1": 2}, timeout=10)
        assert admin(port, "DELETE", "/api/services/user-1")[0] == 204
        wait_until(lambda: served(gateway.port, 2) == {"503": 2}, timeout=10)
    finally:
        target.close()


def test_bad_registrations_are_refused_with_the_field_named(
    registered_gateway: tuple[GatewayProcess, int],
) -> None:
    _, port = registered_gateway
    status, body = admin(
        port, "POST", "/api/services", {"name": "user-service", "host": "10.0.0.5", "port": 80}
    )
    assert status == 403 and body["error"].startswith("host: 10.0.0.5 is not allowed")
    assert "discovery.allowed_networks" in body["error"]
    status, body = admin(
        port, "POST", "/api/services", {"name": "user-service", "host": "169.254.169.254", "port": 80}
    )
    assert status == 403
    status, body = admin(
        port, "POST", "/api/services", {"name": "user-service", "host": "127.0.0.1", "port": 0}
    )
    assert status == 422 and body["error"].startswith("port")
    status, body = admin(
        port, "POST", "/api/services", {"name": "User Service", "host": "127.0.0.1", "port": 80}
    )
    assert status == 422 and body["error"].startswith("name")
    assert admin(port, "POST", "/api/services", [1, 2])[0] == 422
    response = request(
        port, "POST", "/api/services", headers=[("Authorization", f"Bearer {TOKEN}")], body=b"{no"
    )
    assert response.status == 400
    assert admin(port, "DELETE", "/api/services/nobody")[0] == 404


def test_registrations_written_to_redis_are_followed(tmp_path: Path, redis_url: str) -> None:
    target = FaultyUpstream("from-redis").start()
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    config = {
        "admin": None,
        "discovery": {
            "allowed_networks": ["127.0.0.0/8"],
            "redis": {"url": redis_url, "prefix": prefix, "poll_interval": "200ms"},
        },
        "upstreams": {"users": {"service": "user-service"}},
        "routes": [{"path": "/*", "upstream": "users", "retries": 0}],
    }
    gateway = GatewayProcess(tmp_path, config).start()
    client = redis.Redis.from_url(redis_url)
    try:
        value = {"id": "u-9", "name": "user-service", "host": "127.0.0.1", "port": target.port, "ttl": 1}
        client.set(f"{prefix}service:user-service:u-9", orjson.dumps(value), px=1000)
        wait_until(
            lambda: served(gateway.port, 2) == {"from-redis": 2}, timeout=10, message="read from Redis"
        )
        wait_until(lambda: served(gateway.port, 2) == {"503": 2}, timeout=10, message="expired in Redis")
        # Outside the allowed networks: skipped, logged, never used.
        outside = {"id": "u-10", "name": "user-service", "host": "10.1.2.3", "port": 80, "ttl": 5}
        client.set(f"{prefix}service:user-service:u-10", orjson.dumps(outside), px=5000)
        wait_until(lambda: "10.1.2.3 is not allowed" in gateway.output(), timeout=10)
        assert served(gateway.port, 2) == {"503": 2}
    finally:
        client.close()
        gateway.stop()
        target.close()


def test_a_reload_applies_its_allowed_networks_to_redis_registrations(tmp_path: Path, redis_url: str) -> None:
    target = FaultyUpstream("from-redis").start()
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    discovery = {"redis": {"url": redis_url, "prefix": prefix, "poll_interval": "200ms"}}
    config = {
        "admin": None,
        "discovery": {"allowed_networks": ["10.0.0.0/8"], **discovery},
        "upstreams": {"users": {"service": "user-service"}},
        "routes": [{"path": "/*", "upstream": "users", "retries": 0}],
    }
    gateway = GatewayProcess(tmp_path, config, workers=1).start()
    client = redis.Redis.from_url(redis_url)
    try:
        value = {"id": "u-1", "name": "user-service", "host": "127.0.0.1", "port": target.port, "ttl": 60}
        client.set(f"{prefix}service:user-service:u-1", orjson.dumps(value), px=60_000)
        wait_until(lambda: "127.0.0.1 is not allowed" in gateway.output(), timeout=10)
        # The operator lists the network: the registration is admitted...
        gateway.write_config({**config, "discovery": {"allowed_networks": ["127.0.0.0/8"], **discovery}})
        gateway.signal(signal.SIGHUP)
        wait_until(lambda: served(gateway.port, 2) == {"from-redis": 2}, timeout=10, message="admitted")
        # ...and takes it off the list again: it is no longer used.
        gateway.write_config(config)
        gateway.signal(signal.SIGHUP)
        wait_until(lambda: served(gateway.port, 2) == {"503": 2}, timeout=10, message="refused again")
    finally:
        client.close()
        gateway.stop()
        target.close()


def test_a_reload_that_changes_the_redis_source_reads_the_new_one(tmp_path: Path, redis_url: str) -> None:
    first, second = FaultyUpstream("old-prefix").start(), FaultyUpstream("new-prefix").start()
    old, new = f"t{uuid.uuid4().hex[:8]}:", f"t{uuid.uuid4().hex[:8]}:"

    def config(prefix: str) -> dict[str, Any]:
        redis_source = {"url": redis_url, "prefix": prefix, "poll_interval": "200ms"}
        return {
            "admin": None,
            "discovery": {"allowed_networks": ["127.0.0.0/8"], "redis": redis_source},
            "upstreams": {"users": {"service": "user-service"}},
            "routes": [{"path": "/*", "upstream": "users", "retries": 0}],
        }

    gateway = GatewayProcess(tmp_path, config(old)).start()
    client = redis.Redis.from_url(redis_url)
    try:
        for prefix, target in ((old, first), (new, second)):
            value = {"id": "u", "name": "user-service", "host": "127.0.0.1", "port": target.port, "ttl": 60}
            client.set(f"{prefix}service:user-service:u", orjson.dumps(value), px=60_000)
        wait_until(
            lambda: served(gateway.port, 2) == {"old-prefix": 2}, timeout=10, message="old prefix read"
        )
        gateway.write_config(config(new))
        gateway.signal(signal.SIGHUP)
        wait_until(
            lambda: served(gateway.port, 2) == {"new-prefix": 2}, timeout=10, message="new prefix read"
        )
        assert served(gateway.port, 6) == {"new-prefix": 6}  # what the old source held left with it
    finally:
        client.close()
        gateway.stop()
        first.close()
        second.close()
