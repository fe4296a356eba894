"""Consumers and API keys in process: key material, time windows, the service against a real
SQLite store, and the registry (load, merge of config-declared consumers, refresh, failures)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import string
import time
from calendar import timegm
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from apigate.config.loader import ConfigError, load_config
from apigate.config.models import GatewayConfig
from apigate.consumers.keys import (
    KeyHasher,
    display_prefix,
    generate_key,
    generate_key_id,
    hash_key,
    load_key_secret,
)
from apigate.consumers.registry import ConsumerRegistry
from apigate.consumers.service import (
    Conflict,
    ConsumerService,
    Invalid,
    NotFound,
    key_status,
    parse_duration,
    parse_expiry,
)
from apigate.consumers.windows import Schedule, WindowError, check_windows, parse_window
from apigate.store import Store, open_store

BASE62 = set(string.ascii_letters + string.digits)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def utc(text: str) -> float:
    """Unix seconds of "YYYY-MM-DD HH:MM" in UTC."""
    return float(timegm(time.strptime(text, "%Y-%m-%d %H:%M")))


async def opened(path: Path) -> Store:
    store = open_store(f"sqlite:///{path}")
    await store.open()
    return store


def with_store(tmp_path: Path, body: Callable[[Store], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        store = await opened(tmp_path / "apigate.db")
        try:
            return await body(store)
        finally:
            await store.close()

    return run(main())


def config(**data: Any) -> GatewayConfig:
    return GatewayConfig.model_validate(data)


# -- keys -----------------------------------------------------------------------------------------------
def test_generated_keys_are_ak_and_32_base62_chars_and_unique() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert key.startswith("ak_") and len(key) == 35
        assert set(key[3:]) <= BASE62
    assert generate_key_id().startswith("key_")
    assert len({generate_key_id() for _ in range(100)}) == 100


def test_display_prefix_is_the_first_8_chars() -> None:
    assert display_prefix("ak_Xy12abcdef") == "ak_Xy12a"
    assert display_prefix(b"ak_Xy12abcdef") == "ak_Xy12a"


@pytest.mark.parametrize("secret", [b"s", b"x" * 64, b"long" * 40, "zażółć".encode()])
def test_hasher_is_hmac_sha256_hex(secret: bytes) -> None:
    hasher = KeyHasher(secret)
    for key in ("ak_abc", "", "é" * 50, "k" * 1000):
        expected = hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()
        assert hasher.hash(key) == expected == hash_key(secret, key)
        assert hasher.digest(key.encode()).hex() == expected
        assert hasher.matches(key, expected)
        assert hasher.matches(key, expected.upper())
        assert not hasher.matches(key + "x", expected)


def test_hasher_refuses_an_empty_secret() -> None:
    with pytest.raises(ValueError):
        KeyHasher(b"")


def test_key_secret_from_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIGATE_KEY_SECRET", "from-env")

    async def body(store: Store) -> None:
        assert await load_key_secret(store) == b"from-env"
        assert await store.get_setting("key_hash_secret") is None

    with_store(tmp_path, body)


def test_key_secret_is_generated_once_and_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APIGATE_KEY_SECRET", raising=False)

    async def main() -> None:
        first, second = await opened(tmp_path / "a.db"), await opened(tmp_path / "a.db")
        try:
            results = await asyncio.gather(*(load_key_secret(s) for s in (first, second, first, second)))
            assert len(set(results)) == 1 and len(results[0]) >= 32
            assert await first.get_setting("key_hash_secret") == results[0].decode()
        finally:
            await first.close()
            await second.close()

    run(main())


# -- time windows -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "canonical", "days"),
    [
        ("08:00-18:00", "08:00-18:00", (0, 1, 2, 3, 4, 5, 6)),
        ("mon-fri 08:00-18:00", "mon-fri 08:00-18:00", (0, 1, 2, 3, 4)),
        ("MON-FRI 8:00 - 18:00", "mon-fri 08:00-18:00", (0, 1, 2, 3, 4)),
        ("sat, sun 10:00-14:00", "sat,sun 10:00-14:00", (5, 6)),
        ("fri-mon 22:00-06:00", "fri-mon 22:00-06:00", (0, 4, 5, 6)),
        ("wed 00:00-24:00", "wed 00:00-24:00", (2,)),
        ("mon,wed-thu 09:30-10:00", "mon,wed-thu 09:30-10:00", (0, 2, 3)),
    ],
)
def test_window_grammar(text: str, canonical: str, days: tuple[int, ...]) -> None:
    window = parse_window(text)
    assert window.source == canonical
    assert window.days == days


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected [DAYS ]HH:MM-HH:MM"),
        ("8-18", "'8' is not a time"),
        ("08:00", "expected [DAYS ]HH:MM-HH:MM"),
        ("mon-fri", "expected [DAYS ]HH:MM-HH:MM"),
        ("mon-fry 08:00-18:00", "unknown day 'fry'"),
        ("monday 08:00-18:00", "unknown day 'monday'"),
        ("25:00-26:00", "'25:00' is not a time of day"),
        ("08:60-09:00", "'08:60' is not a time of day"),
        ("24:00-06:00", "24:00 can only end a window"),
        ("mon 08:00-08:00", "start and end are the same time"),
        ("mon-fri 08:00-18:00 utc", "expected [DAYS ]HH:MM-HH:MM"),
    ],
)
def test_window_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(WindowError) as info:
        parse_window(text)
    assert message in str(info.value)
    assert repr(text) in str(info.value)


def test_schedule_in_utc_start_included_end_excluded() -> None:
    office = Schedule.parse(["mon-fri 08:00-18:00"])
    assert time.gmtime(utc("2024-01-01 00:00")).tm_wday == 0  # a Monday
    assert office.allows(utc("2024-01-01 08:00"))
    assert office.allows(utc("2024-01-05 17:59") + 59)
    assert not office.allows(utc("2024-01-05 18:00"))
    assert not office.allows(utc("2024-01-01 07:59"))
    assert not office.allows(utc("2024-01-06 12:00"))  # Saturday


def test_schedule_overnight_and_wrapping_days() -> None:
    night = Schedule.parse(["fri 22:00-02:00"])
    assert night.allows(utc("2024-01-05 23:00"))  # Friday night
    assert night.allows(utc("2024-01-06 01:59"))  # Saturday early morning
    assert not night.allows(utc("2024-01-06 02:00"))
    assert not night.allows(utc("2024-01-05 01:00"))  # Friday early morning belongs to Thursday
    weekend = Schedule.parse(["sun 23:00-01:00"])  # wraps past the end of the week
    assert weekend.allows(utc("2024-01-07 23:30")) and weekend.allows(utc("2024-01-08 00:30"))
    assert not weekend.allows(utc("2024-01-08 01:00"))
    either = Schedule.parse(["sat 10:00-12:00", "08:00-09:00"])
    assert either.allows(utc("2024-01-06 11:00")) and either.allows(utc("2024-01-03 08:30"))
    assert not either.allows(utc("2024-01-03 11:00"))


def test_config_refuses_bad_declared_windows() -> None:
    text = """
consumers:
  - id: a
    keys:
      - key: aaaaaaaaaaaaaaaaaaaa
        time_windows: ["mon-fri 08:00-18:00", "tue 9-5"]
"""
    with pytest.raises(ConfigError) as info:
        load_config(text=text)
    assert "consumers[0].keys[0].time_windows" in str(info.value)
    assert check_windows(["Mon 8:00-9:00"]) == ["mon 08:00-09:00"]


# -- service ------------------------------------------------------------------------------------------
def test_create_consumer_and_key_store_only_hash_and_prefix(tmp_path: Path) -> None:
    async def body(store: Store) -> str:
        service = ConsumerService(store)
        consumer = await service.create_consumer("alice", tenant="acme", groups=["a", "b"], metadata={"x": 1})
        assert consumer.created_at > 0
        with pytest.raises(Conflict):
            await service.create_consumer("alice")
        new = await service.create_key("alice", scopes=["read", "write"], allowed_cidrs=["10.1.2.3/8"])
        stored = await store.get_key(new.key.id)
        assert stored is not None
        secret = await load_key_secret(store)
        assert stored.hash == hash_key(secret, new.plaintext)
        assert stored.prefix == new.plaintext[:8]
        assert stored.scopes == ("read", "write")
        assert stored.allowed_cidrs == ("10.0.0.0/8",)  # normalized
        assert [k.id for k in await service.list_keys("alice")] == [new.key.id]
        return new.plaintext

    plaintext = with_store(tmp_path, body)
    for path in tmp_path.glob("apigate.db*"):
        assert plaintext.encode() not in path.read_bytes()


def test_service_validation_errors(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        service = ConsumerService(store)
        for bad in ("", "has space", "-dash-first", "x" * 201, "new\nline"):
            with pytest.raises(Invalid):
                await service.create_consumer(bad)
        await service.create_consumer("bob")
        with pytest.raises(NotFound, match="no consumer 'nobody'"):
            await service.create_key("nobody")
        with pytest.raises(Invalid, match="not an IP network"):
            await service.create_key("bob", allowed_cidrs=["10.0.0.0/33"])
        with pytest.raises(Invalid, match="unknown day 'fry'"):
            await service.create_key("bob", time_windows=["mon-fry 08:00-18:00"])
        with pytest.raises(Invalid, match="scope"):
            await service.create_key("bob", scopes=["has space"])
        with pytest.raises(Invalid, match="not in the future"):
            await service.create_key("bob", expires_at=time.time() - 1)
        with pytest.raises(NotFound):
            await service.revoke_key("key_nope")
        with pytest.raises(NotFound):
            await service.delete_consumer("nobody")
        assert await service.list_keys("bob") == []

    with_store(tmp_path, body)


def test_revoke_and_rotate(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        now = [1_000_000.0]
        service = ConsumerService(store, clock=lambda: now[0])
        await service.create_consumer("carol")
        first = await service.create_key(
            "carol", scopes=["read"], time_windows=["08:00-18:00"], expires_at=now[0] + 10_000
        )
        new, old = await service.rotate_key(first.key.id, grace=3600)
        assert old.revoked_at == now[0] + 3600
        assert key_status(old, now[0]) == "rotating"
        assert new.key.rotated_from == first.key.id
        assert new.key.scopes == ("read",) and new.key.time_windows == ("08:00-18:00",)
        assert new.key.expires_at == now[0] + 10_000
        assert new.plaintext != first.plaintext
        stored_old = await store.get_key(first.key.id)
        assert stored_old is not None and stored_old.revoked_at == now[0] + 3600

        # Revoking a key in its grace period ends it now; revoking twice changes nothing.
        now[0] += 10
        revoked = await service.revoke_key(first.key.id)
        assert revoked.revoked_at == now[0] and key_status(revoked, now[0]) == "revoked"
        now[0] += 10
        assert (await service.revoke_key(first.key.id)).revoked_at == now[0] - 10
        with pytest.raises(Conflict, match="revoked"):
            await service.rotate_key(first.key.id)

        # The default grace is 24 h; rotating during a grace period never extends it.
        third, second = await service.rotate_key(new.key.id)
        assert second.revoked_at == now[0] + 24 * 3600
        _, second_again = await service.rotate_key(new.key.id, grace=48 * 3600)
        assert second_again.revoked_at == second.revoked_at
        assert third.key.rotated_from == new.key.id

        await service.delete_consumer("carol")
        assert await store.list_keys("carol") == []

    with_store(tmp_path, body)


def test_parse_expiry_and_durations() -> None:
    now = 1_700_000_000.0
    assert parse_expiry("30d", now) == now + 30 * 86400
    assert parse_expiry("12h", now) == now + 12 * 3600
    assert parse_expiry("2030-01-31T18:00:00Z", now) == utc("2030-01-31 18:00")
    assert parse_expiry("2030-01-31T18:00:00", now) == utc("2030-01-31 18:00")
    assert parse_expiry("2030-01-31T20:00:00+02:00", now) == utc("2030-01-31 18:00")
    with pytest.raises(Invalid, match="not in the future"):
        parse_expiry("2001-01-01T00:00:00Z", now)
    with pytest.raises(Invalid, match="neither an ISO 8601"):
        parse_expiry("next tuesday", now)
    assert parse_duration("24h") == 86400 and parse_duration("2w") == 14 * 86400
    assert parse_duration("90") == 90
    with pytest.raises(Invalid):
        parse_duration("soon")


# -- registry -----------------------------------------------------------------------------------------
DECLARED = {
    "store": {"url": "sqlite:///unused.db", "poll_interval": "50ms"},
    "consumers": [
        {
            "id": "partner",
            "tenant": "p-tenant",
            "groups": ["partners"],
            "keys": [{"key": "partner-key-0123456789abcdef", "scopes": ["read"]}],
        },
        {"id": "dave", "tenant": "from-config", "keys": [{"key": "dave-config-key-0123456789"}]},
    ],
}


def test_registry_loads_the_store_and_merges_declared_consumers(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        service = ConsumerService(store)
        await service.create_consumer("alice", tenant="acme")
        await service.create_consumer("dave", tenant="from-store")
        alice = await service.create_key("alice", scopes=["read"])
        dave = await service.create_key("dave")
        gone = await service.create_key("alice")
        await service.revoke_key(gone.key.id)
        rotating = await service.create_key("alice")
        await service.rotate_key(rotating.key.id, grace=3600)
        await service.create_consumer("off")
        off = await service.create_key("off")
        await service.set_disabled("off", True)

        registry = ConsumerRegistry(store, config(**DECLARED))
        await registry.start()
        try:
            assert registry.consumer_count() == 4  # alice, dave, off, partner
            match = registry.lookup(alice.plaintext.encode())
            assert match is not None and match.consumer.id == "alice" and match.consumer.tenant == "acme"
            assert match.scopes == frozenset({"read"}) and match.deadline is None
            declared = registry.lookup(b"partner-key-0123456789abcdef")
            assert declared is not None and declared.declared
            assert declared.consumer.tenant == "p-tenant" and declared.consumer.groups == ("partners",)
            assert declared.key.hash == (await registry_hasher(store)).hash("partner-key-0123456789abcdef")
            # A consumer declared in the config and stored: the config's fields win, both keys work.
            assert registry.consumer("dave").tenant == "from-config"  # type: ignore[union-attr]
            for plain in (dave.plaintext.encode(), b"dave-config-key-0123456789"):
                found = registry.lookup(plain)
                assert found is not None and found.consumer.tenant == "from-config"
            assert registry.lookup(gone.plaintext.encode()) is None  # revoked
            pending = registry.lookup(rotating.plaintext.encode())
            assert pending is not None and pending.deadline is not None and pending.deadline > time.time()
            assert registry.lookup(off.plaintext.encode()) is None  # disabled consumer
            assert registry.lookup(b"unknown") is None
            assert registry.lookup(b"x" * 100_000) is None
            # Declared consumers are never written to the store.
            assert await store.get_consumer("partner") is None
        finally:
            await registry.stop()

    with_store(tmp_path, body)


async def registry_hasher(store: Store) -> KeyHasher:
    return KeyHasher(await load_key_secret(store))


def test_registry_follows_store_changes_and_config_reloads(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        service = ConsumerService(store)
        registry = ConsumerRegistry(store, config(**DECLARED))
        await registry.start()
        try:
            await service.create_consumer("erin")
            new = await service.create_key("erin")
            await wait_for(lambda: registry.lookup(new.plaintext.encode()) is not None)
            await service.revoke_key(new.key.id)
            await wait_for(lambda: registry.lookup(new.plaintext.encode()) is None)

            registry.apply_config(config(store=DECLARED["store"]))  # the declared consumers are gone
            assert registry.lookup(b"partner-key-0123456789abcdef") is None
            assert registry.consumer("partner") is None and registry.consumer("erin") is not None
            registry.apply_config(config(**DECLARED))
            assert registry.lookup(b"partner-key-0123456789abcdef") is not None
        finally:
            await registry.stop()

    with_store(tmp_path, body)


class FlakyStore:
    """Wraps a store; while ``failing`` is set, reads raise as a lost database connection would."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.failing = False
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if name in ("change_version", "list_consumers", "list_keys"):

            async def guarded(*args: Any, **kwargs: Any) -> Any:
                if self.failing:
                    self.failures += 1
                    raise ConnectionError("database went away")
                return await attr(*args, **kwargs)

            return guarded
        return attr


def test_registry_keeps_serving_when_the_store_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(store: Store) -> None:
        service = ConsumerService(store)
        await service.create_consumer("frank")
        kept = await service.create_key("frank")
        flaky = FlakyStore(store)
        registry = ConsumerRegistry(flaky, config(store=DECLARED["store"]))  # type: ignore[arg-type]
        await registry.start()
        try:
            flaky.failing = True
            await wait_for(lambda: flaky.failures >= 3)
            assert registry.lookup(kept.plaintext.encode()) is not None
            later = await service.create_key("frank")
            flaky.failing = False
            await wait_for(lambda: registry.lookup(later.plaintext.encode()) is not None)
        finally:
            await registry.stop()

    with caplog.at_level("WARNING", logger="apigate.consumers"):
        with_store(tmp_path, body)
    errors = [r for r in caplog.records if "cannot read the consumer store" in r.getMessage()]
    assert len(errors) == 1  # logged once, not on every poll
    assert any("readable again" in r.getMessage() for r in caplog.records)


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
