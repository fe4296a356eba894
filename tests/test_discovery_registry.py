"""Self-registration: the in-memory registry (an injected clock drives its ttl), the network
allow-list that keeps registrations off internal hosts, and the Redis format on a real Redis
(real expiry: short PX values, polled with a deadline)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest
import redis

from apigate.discovery.networks import IPNetwork, address_allowed, resolve_allowed
from apigate.discovery.registry import (
    Entry,
    RedisServiceSource,
    Registration,
    RegistrationError,
    RegistryFull,
    ServiceRegistry,
    parse_registration,
)
from tests.support.state import Run

PUBLIC = ("0.0.0.0/0", "::/0")
INTERNAL = ("10.0.0.0/8",)


def networks(*texts: str) -> list[IPNetwork]:
    return [ipaddress.ip_network(text) for text in texts]


def registration(**fields: Any) -> Registration:
    return Registration.model_validate({"name": "users", "host": "10.0.0.5", "port": 8080, **fields})


class ManualClock:
    """The registry's clock, moved by the test: expiry never depends on how fast the test runs."""

    def __init__(self, start: float = 500.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Changes(list[str]):
    """Records the service names that on_change reports."""

    def __call__(self, name: str) -> None:
        self.append(name)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def changes() -> Changes:
    return Changes()


@pytest.fixture
def registry(clock: ManualClock, changes: Changes) -> ServiceRegistry:
    return ServiceRegistry(networks(*INTERNAL), clock, changes, wall_clock=lambda: 1_700_000_000.0)


# -- the memory registry ----------------------------------------------------------------------------
def test_register_lists_the_entry_at_its_checked_address(
    registry: ServiceRegistry, changes: Changes, run: Run
) -> None:
    entry = run(registry.register(registration(id="users-1", weight=3, metadata={"zone": "a"})))
    assert registry.endpoints("users") == [entry]
    assert registry.entries() == [entry]
    assert registry.endpoints("orders") == []
    assert (entry.id, entry.address, entry.expires_at) == ("users-1", "10.0.0.5", 530.0)
    assert changes == ["users"]
    shown = entry.describe()
    assert shown["registered_at"] == shown["last_heartbeat"] == "2023-11-14T22:13:20.000+00:00"
    assert shown["expires_at"] == "2023-11-14T22:13:50.000+00:00"
    assert (shown["address"], shown["port"], shown["weight"], shown["metadata"]) == (
        "10.0.0.5",
        8080,
        3,
        {"zone": "a"},
    )


def test_an_absent_id_is_generated_from_the_service_name(registry: ServiceRegistry, run: Run) -> None:
    first = run(registry.register(registration()))
    second = run(registry.register(registration()))
    assert re.fullmatch(r"users-[0-9a-f]{8}", first.id)
    assert first.id != second.id
    assert len(registry.endpoints("users")) == 2


def test_heartbeats_keep_an_entry_and_it_leaves_a_ttl_after_they_stop(
    registry: ServiceRegistry, clock: ManualClock, changes: Changes, run: Run
) -> None:
    run(registry.register(registration(id="users-1", ttl=10)))
    for _ in range(5):  # 40 s in all, four times the ttl
        clock.advance(8)
        assert registry.heartbeat("users-1") is True
        assert registry.expire() == []
    assert [entry.last_heartbeat for entry in registry.endpoints("users")] == [540.0]
    clock.advance(9.9)
    assert registry.expire() == []
    clock.advance(0.1)  # 10 s after the last heartbeat
    assert registry.endpoints("users") == []  # no longer served, even before the sweep
    assert [entry.id for entry in registry.expire()] == ["users-1"]
    assert changes == ["users", "users"]
    assert registry.heartbeat("users-1") is False
    assert registry.entries() == []


def test_a_heartbeat_does_not_revive_an_expired_entry(
    registry: ServiceRegistry, clock: ManualClock, run: Run
) -> None:
    run(registry.register(registration(id="users-1", ttl=5)))
    clock.advance(5)
    assert registry.heartbeat("users-1") is False  # expired, not yet swept
    assert registry.heartbeat("nobody") is False
    assert registry.endpoints("users") == []


def test_deregister_removes_the_entry_at_once(registry: ServiceRegistry, changes: Changes, run: Run) -> None:
    run(registry.register(registration(id="users-1")))
    run(registry.register(registration(id="users-2", host="10.0.0.6")))
    assert registry.deregister("users-1") is True
    assert [entry.id for entry in registry.endpoints("users")] == ["users-2"]
    assert registry.deregister("users-1") is False
    assert registry.heartbeat("users-1") is False
    assert changes == ["users", "users", "users"]


def test_registering_an_id_again_refreshes_it(
    registry: ServiceRegistry, clock: ManualClock, changes: Changes, run: Run
) -> None:
    run(registry.register(registration(id="users-1", ttl=10)))
    clock.advance(8)
    again = run(registry.register(registration(id="users-1", ttl=10)))
    assert (again.registered_at, again.last_heartbeat, again.expires_at) == (500.0, 508.0, 518.0)
    assert changes == ["users"]  # the same endpoint: nothing for the upstreams to rebuild
    moved = run(registry.register(registration(id="users-1", ttl=10, port=9090)))
    assert registry.endpoints("users") == [moved]
    assert changes == ["users", "users"]
    run(registry.register(registration(id="users-1", name="orders")))  # the id now names another service
    assert registry.endpoints("users") == []
    assert [entry.id for entry in registry.endpoints("orders")] == ["users-1"]
    assert changes == ["users", "users", "users", "orders"]


def test_a_narrower_allow_list_removes_what_it_no_longer_lists(
    registry: ServiceRegistry, changes: Changes, run: Run
) -> None:
    run(registry.register(registration(id="users-1", host="10.0.0.5")))
    run(registry.register(registration(id="users-2", host="10.9.0.5")))
    run(registry.register(registration(id="orders-1", name="orders", host="10.9.0.6")))
    changes.clear()
    registry.set_allowed(networks("10.0.0.0/16"))
    # Heartbeats would otherwise keep the dropped network's instances in rotation for good.
    assert [entry.id for entry in registry.entries()] == ["users-1"]
    assert registry.heartbeat("users-2") is False
    assert sorted(changes) == ["orders", "users"]


def test_the_cap_refuses_new_entries_until_one_leaves(clock: ManualClock, run: Run) -> None:
    registry = ServiceRegistry(networks(*INTERNAL), clock, max_entries=2)
    run(registry.register(registration(id="a", ttl=5)))
    run(registry.register(registration(id="b", ttl=60)))
    with pytest.raises(RegistryFull) as refused:
        run(registry.register(registration(id="c")))
    assert refused.value.field == "id"
    assert "maximum of 2 entries" in refused.value.message
    run(registry.register(registration(id="b", ttl=60)))  # refreshing one already held is no new entry
    clock.advance(5)  # "a" expires, and its place is free again
    run(registry.register(registration(id="c")))
    assert [entry.id for entry in registry.entries()] == ["b", "c"]


def test_a_failing_listener_does_not_undo_a_change(
    clock: ManualClock, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(name: str) -> None:
        raise RuntimeError("listener broke")

    registry = ServiceRegistry(networks(*INTERNAL), clock, broken)
    with caplog.at_level(logging.ERROR, logger="apigate.discovery"):
        run(registry.register(registration(id="users-1")))
    assert [entry.id for entry in registry.endpoints("users")] == ["users-1"]
    assert "on_change failed for service users" in caplog.text


# -- the network rule -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "listed", "allowed"),
    [
        ("10.0.0.5", PUBLIC, False),
        ("10.0.0.5", INTERNAL, True),
        ("10.0.0.5", ("10.0.0.0/7",), False),  # a range holding public addresses is a public range
        ("8.8.8.8", PUBLIC, True),
        ("8.8.8.8", INTERNAL, False),
        ("169.254.169.254", PUBLIC, False),  # the cloud metadata service
        ("169.254.169.254", ("169.254.169.254/32",), True),
        ("fd00:ec2::254", PUBLIC, False),
        ("fd00:ec2::254", ("fd00::/8",), True),
        ("100.64.0.1", PUBLIC, False),  # carrier-grade NAT
        ("127.0.0.1", PUBLIC, False),
        ("::1", ("::/1",), False),
        ("0.0.0.0", PUBLIC, False),
        ("224.0.0.1", PUBLIC, False),
        ("ff02::1", PUBLIC, False),
        ("fec0::1", PUBLIC, False),  # IPv6 site-local
        ("64:ff9b:1::a00:5", PUBLIC, False),  # local-use NAT64
        ("2606:4700::1111", PUBLIC, True),
        ("::ffff:127.0.0.1", PUBLIC, False),  # IPv4-mapped: judged as 127.0.0.1
        ("::ffff:10.0.0.5", INTERNAL, True),
        ("::ffff:8.8.8.8", ("::/0",), False),
        ("64:ff9b::a9fe:a9fe", PUBLIC, False),  # NAT64 to 169.254.169.254
        ("64:ff9b::808:808", PUBLIC, True),
        ("2002:a00:5::1", PUBLIC, False),  # 6to4 carrying 10.0.0.5
    ],
)
def test_address_allowed(address: str, listed: tuple[str, ...], allowed: bool) -> None:
    assert address_allowed(ipaddress.ip_address(address), networks(*listed)) is allowed


def test_an_internal_address_needs_its_network_listed(run: Run) -> None:
    refused = ServiceRegistry(networks(*PUBLIC))
    with pytest.raises(RegistrationError) as error:
        run(refused.register(registration(host="10.0.0.5")))
    assert error.value.field == "host"
    assert "10.0.0.5" in error.value.message and "discovery.allowed_networks" in error.value.message
    assert refused.entries() == []
    admitted = ServiceRegistry(networks(*PUBLIC, *INTERNAL))
    assert run(admitted.register(registration(host="10.0.0.5"))).address == "10.0.0.5"


@pytest.mark.parametrize("host", ["169.254.169.254", "::ffff:127.0.0.1", "127.0.0.1", "localhost"])
def test_hosts_inside_the_gateway_or_its_cloud_are_refused_with_public_ranges_listed(
    host: str, run: Run
) -> None:
    registry = ServiceRegistry(networks(*PUBLIC))
    with pytest.raises(RegistrationError) as error:
        run(registry.register(registration(host=host)))
    assert error.value.field == "host"
    assert "discovery.allowed_networks does not list it" in error.value.message


def test_a_name_is_resolved_once_and_its_address_kept(run: Run) -> None:
    registry = ServiceRegistry(networks("127.0.0.0/8", "::1/128"))
    entry = run(registry.register(registration(host="localhost")))
    assert entry.registration.host == "localhost"
    assert ipaddress.ip_address(entry.address).is_loopback


def test_an_ipv4_mapped_literal_is_connected_to_as_ipv4(run: Run) -> None:
    async def resolve(host: str) -> str:
        return await resolve_allowed(host, networks(*INTERNAL), asyncio.get_running_loop())

    assert run(resolve("::ffff:10.0.0.5")) == "10.0.0.5"
    assert run(resolve("[::ffff:10.0.0.5]")) == "10.0.0.5"


def test_the_health_url_host_passes_the_same_check(run: Run) -> None:
    registry = ServiceRegistry(networks(*INTERNAL))
    with pytest.raises(RegistrationError) as error:
        run(registry.register(registration(health="http://169.254.169.254/latest/meta-data/")))
    assert error.value.field == "health"
    entry = run(registry.register(registration(health="http://10.0.0.9:8081/health")))
    assert entry.health_address == "10.0.0.9"


# -- what a registration may say --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"port": "8080"}, "port"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"port": True}, "port"),
        ({"name": "Users"}, "name"),
        ({"name": "-users"}, "name"),
        ({"name": None}, "name"),
        ({"host": "http://10.0.0.5"}, "host"),
        ({"host": "users.local:8080"}, "host"),
        ({"host": ""}, "host"),
        ({"scheme": "ftp"}, "scheme"),
        ({"ttl": 0.5}, "ttl"),
        ({"ttl": 86401}, "ttl"),
        ({"ttl": "30"}, "ttl"),
        ({"ttl": float("nan")}, "ttl"),
        ({"weight": -1}, "weight"),
        ({"weight": 10001}, "weight"),
        ({"metadata": {f"k{i}": "v" for i in range(33)}}, "metadata"),
        ({"metadata": {"team": 7}}, "metadata.team"),
        ({"metadata": {"team": "x" * 257}}, "metadata.team"),
        ({"health": "ftp://10.0.0.5/health"}, "health"),
        ({"health": "/health"}, "health"),
        ({"id": "users 1"}, "id"),
        ({"id": "u" * 129}, "id"),
        ({"tags": ["a"]}, "tags"),
    ],
)
def test_a_malformed_registration_names_its_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(RegistrationError) as error:
        parse_registration({"name": "users", "host": "10.0.0.5", "port": 8080, **fields})
    assert error.value.field == field
    assert str(error.value).startswith(f"{field}: ")


def test_a_missing_field_and_a_body_that_is_no_object_are_named() -> None:
    with pytest.raises(RegistrationError) as missing:
        parse_registration({"name": "users", "host": "10.0.0.5"})
    assert missing.value.field == "port"
    with pytest.raises(RegistrationError) as not_an_object:
        parse_registration(["users"])
    assert not_an_object.value.field == "registration"


def test_the_go_style_shape_is_accepted() -> None:
    parsed = parse_registration(
        {
            "ID": "user-service-1",
            "Name": "user-service",
            "Host": "10.0.0.5",
            "Port": 8080,
            "Protocol": "HTTPS",
            "Health": {"HTTP": "http://10.0.0.5:8080/health", "Interval": "30s", "Timeout": "5s"},
        }
    )
    assert parsed == Registration(
        id="user-service-1",
        name="user-service",
        host="10.0.0.5",
        port=8080,
        scheme="https",
        health="http://10.0.0.5:8080/health",
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"Health": {"HTTP": "http://10.0.0.5/health", "Script": "check.sh"}}, "health"),
        ({"Health": {"Interval": "30s"}}, "health"),
        ({"Health": {"HTTP": "http://10.0.0.5/health", "Interval": 30}}, "health"),
        ({"Port": "8080"}, "port"),
        ({"ID": "a", "id": "b"}, "ID"),  # one id, not two
        ({"Tags": ["a"]}, "Tags"),
    ],
)
def test_a_malformed_go_style_registration_names_its_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(RegistrationError) as error:
        parse_registration({"Name": "users", "Host": "10.0.0.5", "Port": 8080, **fields})
    assert error.value.field == field


# -- the Redis format -------------------------------------------------------------------------------
@pytest.fixture
def raw_redis(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client, writing keys as a service (or redis-cli) would."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def source(redis_url: str, run: Run) -> Iterator[RedisServiceSource]:
    service_source = RedisServiceSource(redis_url, networks(*INTERNAL))
    yield service_source
    run(service_source.close())


def document(**fields: Any) -> bytes:
    """A registration's JSON as the documented format stores it."""
    return orjson.dumps({"id": "users-1", "name": "users", "host": "10.0.0.5", "port": 8080, **fields})


async def eventually(check: Callable[[], Awaitable[bool]], limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def ids(found: dict[str, list[Entry]]) -> dict[str, list[str]]:
    return {name: [entry.id for entry in entries] for name, entries in found.items()}


def test_write_stores_the_documented_key_and_json(
    source: RedisServiceSource, raw_redis: redis.Redis, run: Run
) -> None:
    reg = registration(id="users-1", ttl=20, metadata={"zone": "a"})
    run(source.write(reg))
    assert orjson.loads(raw_redis.get("apigate:service:users:users-1")) == reg.model_dump(mode="json")
    assert 19_000 < raw_redis.pttl("apigate:service:users:users-1") <= 20_000
    found = run(source.read())
    assert ids(found) == {"users": ["users-1"]}
    [entry] = found["users"]
    assert (entry.registration, entry.address, entry.registered_at) == (reg, "10.0.0.5", None)
    assert entry.describe()["expires_at"] is not None


def test_a_key_lives_while_heartbeats_come_and_leaves_a_ttl_after_they_stop(
    source: RedisServiceSource, raw_redis: redis.Redis, run: Run
) -> None:
    key = "apigate:service:users:users-1"
    raw_redis.set(key, document(ttl=1), px=300)  # SET key json PX ttl_ms

    async def scenario() -> None:
        started = time.monotonic()
        while time.monotonic() - started < 1.0:  # over three ttls
            last_heartbeat = time.monotonic()
            assert raw_redis.pexpire(key, 300) is True  # the heartbeat: PEXPIRE key ttl_ms
            assert ids(await source.read()) == {"users": ["users-1"]}
            await asyncio.sleep(0.1)

        async def gone() -> bool:
            return await source.read() == {}

        await eventually(gone)
        assert time.monotonic() - last_heartbeat >= 0.29  # not before its ttl (less clock skew)

    run(scenario())


def test_source_heartbeat_and_delete(source: RedisServiceSource, raw_redis: redis.Redis, run: Run) -> None:
    run(source.write(registration(id="users-1", ttl=5)))
    assert run(source.heartbeat("users", "users-1", 60)) is True
    assert 59_000 < raw_redis.pttl("apigate:service:users:users-1") <= 60_000
    assert run(source.heartbeat("users", "users-2", 60)) is False
    assert run(source.delete("users", "users-1")) is True
    assert run(source.delete("users", "users-1")) is False
    assert run(source.read()) == {}
    with pytest.raises(RegistrationError) as error:
        run(source.heartbeat("users", "users-1", 0))
    assert error.value.field == "ttl"
    with pytest.raises(RegistrationError) as error:
        run(source.delete("Users*", "users-1"))
    assert error.value.field == "name"


def test_write_refuses_an_address_readers_would_skip(
    source: RedisServiceSource, raw_redis: redis.Redis, run: Run
) -> None:
    with pytest.raises(RegistrationError) as error:
        run(source.write(registration(host="169.254.169.254")))
    assert error.value.field == "host"
    assert raw_redis.keys("*") == []


def test_entries_that_fail_are_skipped_and_logged_once(
    source: RedisServiceSource, raw_redis: redis.Redis, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    raw_redis.set("apigate:service:users:users-1", document(), px=60_000)
    skipped = {
        "apigate:service:users:garbage": b"{not json",
        "apigate:service:users:users-2": document(id="users-2", port="8080"),
        "apigate:service:users:users-3": document(id="users-3", host="10.0.0.5", name="orders"),
        "apigate:service:users:users-4": document(id="users-4", host="127.0.0.1"),
    }
    for key, value in skipped.items():
        raw_redis.set(key, value, px=60_000)
    raw_redis.set("apigate:service:users:users-5", document(id="users-5"))  # no expiry
    with caplog.at_level(logging.WARNING, logger="apigate.discovery"):
        assert ids(run(source.read())) == {"users": ["users-1"]}
        assert ids(run(source.read())) == {"users": ["users-1"]}
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 5, warnings  # one per key, not one per read
    by_key = {message.split()[4].rstrip(":"): message for message in warnings}
    assert "not JSON" in by_key["apigate:service:users:garbage"]
    assert "port:" in by_key["apigate:service:users:users-2"]
    assert "belongs at apigate:service:orders:users-3" in by_key["apigate:service:users:users-3"]
    assert "host: 127.0.0.1 is not allowed" in by_key["apigate:service:users:users-4"]
    assert "no expiry" in by_key["apigate:service:users:users-5"]
    caplog.clear()
    raw_redis.set("apigate:service:users:garbage", b"[]", px=60_000)  # a new value is news again
    with caplog.at_level(logging.WARNING, logger="apigate.discovery"):
        run(source.read())
    assert [record.getMessage().split()[4] for record in caplog.records] == ["apigate:service:users:garbage:"]


def test_read_takes_only_its_prefix(redis_url: str, raw_redis: redis.Redis, run: Run) -> None:
    raw_redis.set("apigate:service:users:users-1", document(), px=60_000)
    raw_redis.set("t[1]:service:users:users-2", document(id="users-2"), px=60_000)
    raw_redis.set("t1:service:users:users-3", document(id="users-3"), px=60_000)
    other = RedisServiceSource(redis_url, networks(*INTERNAL), prefix="t[1]:", scan_count=1)
    try:
        assert ids(run(other.read())) == {"users": ["users-2"]}
    finally:
        run(other.close())


def test_read_takes_at_most_max_entries(
    redis_url: str, raw_redis: redis.Redis, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    for number in range(5):
        raw_redis.set(f"apigate:service:users:users-{number}", document(id=f"users-{number}"), px=60_000)
    capped = RedisServiceSource(redis_url, networks(*INTERNAL), max_entries=3, scan_count=2)
    try:
        with caplog.at_level(logging.WARNING, logger="apigate.discovery"):
            assert len(run(capped.read())["users"]) == 3
            assert len(run(capped.read())["users"]) == 3
    finally:
        run(capped.close())
    assert [record.getMessage() for record in caplog.records] == [
        "discovery: Redis holds more than 3 registrations; reading 3 of them (max_entries)"
    ]
