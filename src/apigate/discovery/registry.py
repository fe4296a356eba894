"""Services that register themselves, so that an upstream can take its targets from a service name.

A registration names a service, one instance of it (``id``) and where that instance listens. It
lives for ``ttl`` seconds unless a heartbeat extends it, so an instance that dies without
deregistering leaves by itself. Two places hold registrations:

- ``ServiceRegistry``: in this process's memory, fed by the admin API; ``expire()`` removes what
  outlived its ttl and ``on_change`` names each service whose set of endpoints changed.
- ``RedisServiceSource``: Redis keys that services (or anything acting for them) write directly,
  one key per instance with the registration's JSON and a PX expiry (the format is in
  docs/discovery.md); Redis expires what is not refreshed, and ``read()`` takes every live one.

Both admit an address only if ``discovery.allowed_networks`` lists it (``networks.py``), and keep
the address they checked: the gateway connects there and never resolves the name again, so a
name cannot be pointed at an internal host after it was admitted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, cast
from urllib.parse import urlsplit

import orjson
import redis.asyncio as redis
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from apigate.config.validators import check_http_url
from apigate.discovery.networks import IPNetwork, RegistrationError, address_allowed, resolve_allowed

__all__ = [
    "Entry",
    "RedisServiceSource",
    "Registration",
    "RegistrationError",
    "RegistryFull",
    "ServiceRegistry",
    "parse_registration",
]

log = logging.getLogger("apigate.discovery")

ID_PATTERN: Final = r"^[A-Za-z0-9._:-]{1,128}$"
NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9._-]{0,62}$"
DEFAULT_TTL: Final = 30.0
MIN_TTL: Final = 1.0
MAX_TTL: Final = 86400.0
MAX_ENTRIES: Final = 10_000
SCAN_COUNT: Final = 500
REDIS_TIMEOUT: Final = 5.0

# Host names as DNS and container platforms write them (Docker allows "_" in service names).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")

# The shape other gateways document ({"ID": ..., "Health": {"HTTP": url}}): each key's field here.
_GO_STYLE_KEYS: Final = {
    "ID": "id",
    "Name": "name",
    "Host": "host",
    "Port": "port",
    "Protocol": "scheme",
    "Health": "health",
}
_GO_STYLE_HEALTH_KEYS: Final = ("HTTP", "Interval", "Timeout")

MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=256)]


class RegistryFull(RegistrationError):
    """The registry holds its maximum number of entries: a new one waits for others to leave."""


class Registration(BaseModel):
    """One instance of a service, as a client registers it (the admin API's body, a Redis value).

    Strict: a port sent as "8080" or a ttl as "30" is refused, not converted, and an unknown key is
    an error, so a typo never registers something other than what was meant."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    # Generated as "<name>-<8 hex digits>" when absent, so it is never None after validation.
    id: Annotated[str, StringConstraints(pattern=ID_PATTERN)] | None = None
    name: Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
    host: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    port: int = Field(ge=1, le=65535)
    scheme: Literal["http", "https"] = "http"
    health: Annotated[str, StringConstraints(max_length=2048)] | None = None
    ttl: float = Field(default=DEFAULT_TTL, ge=MIN_TTL, le=MAX_TTL)
    weight: int = Field(default=1, ge=0, le=10000)
    metadata: dict[MetadataKey, MetadataValue] = Field(default_factory=dict, max_length=32)

    @model_validator(mode="before")
    @classmethod
    def _fill(cls, data: Any) -> Any:
        """Maps the Go-style keys and generates a missing id."""
        if not isinstance(data, dict):
            return data
        shaped: dict[Any, Any] = {}
        for key, value in data.items():
            field = _GO_STYLE_KEYS.get(key) if isinstance(key, str) else None
            if field is None or field in data:
                shaped[key] = value  # both "ID" and "id": "ID" stays, refused as an unknown key
            else:
                shaped[field] = value.lower() if field == "scheme" and isinstance(value, str) else value
        name = shaped.get("name")
        if shaped.get("id") is None and isinstance(name, str) and re.match(NAME_PATTERN, name):
            shaped["id"] = f"{name}-{secrets.token_hex(4)}"
        return shaped

    @field_validator("host")
    @classmethod
    def _check_host(cls, host: str) -> str:
        literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            return str(ipaddress.ip_address(literal))
        except ValueError:
            pass
        if not _HOST_NAME.match(host):
            raise ValueError(
                "must be an IP address or a host name such as user-service.local (no scheme or port)"
            )
        return host

    @field_validator("health", mode="before")
    @classmethod
    def _go_style_health(cls, health: Any) -> Any:
        """``{"HTTP": url, "Interval": "30s", "Timeout": "5s"}`` is taken as its URL."""
        if not isinstance(health, dict):
            return health
        for key in health:
            if key not in _GO_STYLE_HEALTH_KEYS:
                raise ValueError(f"a health object takes only HTTP, Interval and Timeout, not {key!r}")
        for key in ("Interval", "Timeout"):
            if not isinstance(health.get(key, ""), str):
                raise ValueError(f"{key} must be a duration such as 30s")
        if "HTTP" not in health:
            raise ValueError("a health object needs HTTP, the URL to check")
        return health["HTTP"]

    @field_validator("health")
    @classmethod
    def _check_health(cls, health: str | None) -> str | None:
        return None if health is None else check_http_url(health)

    @property
    def instance_id(self) -> str:
        """``id``: validation always fills it."""
        return cast(str, self.id)

    def to_json(self) -> bytes:
        """The registration as the Redis format stores it (and as the admin API shows it)."""
        return orjson.dumps(self.model_dump(mode="json"))


def parse_registration(data: object) -> Registration:
    """``data`` (decoded JSON) as a Registration; raises RegistrationError naming the first field
    that is wrong, as ``port`` or ``metadata.team``."""
    try:
        return Registration.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in error["loc"]) or "registration"
        message = error["msg"].removeprefix("Value error, ")
        raise RegistrationError(field, message) from None


Resolve = Callable[[str, str], Awaitable[str]]


async def admit(registration: Registration, resolve: Resolve) -> tuple[str, str | None]:
    """The checked addresses of the registration's host and of its health URL's host."""
    address = await resolve(registration.host, "host")
    if registration.health is None:
        return address, None
    health_host = urlsplit(registration.health).hostname or ""
    return address, await resolve(health_host, "health")


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class Entry:
    """A live registration and what the gateway checked about it. Times are by the registry's clock
    (``time.monotonic`` unless injected); ``describe()`` shows them as wall-clock dates."""

    registration: Registration
    address: str  # the host's admitted address: connect here, never to a fresh resolution
    health_address: str | None  # the same for the health URL's host
    registered_at: float | None  # None when unknown (an entry read from Redis)
    last_heartbeat: float | None
    expires_at: float
    wall_offset: float  # the wall clock minus the registry's clock, when the entry was last touched

    @property
    def id(self) -> str:
        return self.registration.instance_id

    @property
    def name(self) -> str:
        return self.registration.name

    def expired(self, now: float) -> bool:
        return self.expires_at <= now

    def describe(self) -> dict[str, Any]:
        """What an operator reads (the admin API's listing): the registration, the address it
        was admitted at, and its times as ISO 8601 dates in UTC."""

        def wall(at: float | None) -> str | None:
            return None if at is None else _iso(at + self.wall_offset)

        return {
            **self.registration.model_dump(mode="json"),
            "address": self.address,
            "health_address": self.health_address,
            "registered_at": wall(self.registered_at),
            "last_heartbeat": wall(self.last_heartbeat),
            "expires_at": wall(self.expires_at),
        }


class ServiceRegistry:
    """Registrations held in this process's memory (one registry per gateway node).

    Entries leave when deregistered or when ``expire()`` finds their ttl passed since the last
    registration or heartbeat; call it periodically (every second is plenty). ``on_change(name)``
    is called after each change to a service's endpoints (not after a mere heartbeat)."""

    def __init__(
        self,
        allowed_networks: Sequence[IPNetwork],
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str], None] | None = None,
        *,
        max_entries: int = MAX_ENTRIES,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._allowed = tuple(allowed_networks)
        self._clock = clock
        self._wall_clock = wall_clock
        self._on_change = on_change
        self._max_entries = max_entries
        self._by_id: dict[str, Entry] = {}
        self._by_service: dict[str, dict[str, Entry]] = {}

    def set_allowed(self, allowed_networks: Sequence[IPNetwork]) -> None:
        """The allow-list of a reloaded config: registrations from now on are checked against it,
        and held ones at an address it no longer lists leave at once (heartbeats would otherwise
        keep them in rotation for good), as the Redis source drops them on its next read."""
        self._allowed = allowed = tuple(allowed_networks)
        gone = [
            entry
            for entry in self._by_id.values()
            if not all(
                address_allowed(ipaddress.ip_address(address), allowed)
                for address in (entry.address, entry.health_address)
                if address is not None
            )
        ]
        for entry in gone:
            self._remove(entry)
        for name in sorted({entry.name for entry in gone}):
            self._notify(name)

    async def register(self, registration: Registration) -> Entry:
        """Admits the registration (RegistrationError naming ``host`` or ``health`` if its address
        is not allowed; RegistryFull at the cap) and holds it for its ttl. The same id again
        refreshes the entry, taking what it says now."""
        loop = asyncio.get_running_loop()

        def resolve(host: str, field: str) -> Awaitable[str]:
            return resolve_allowed(host, self._allowed, loop, field)

        address, health_address = await admit(registration, resolve)
        # Nothing below awaits, so the registry cannot change between this check and the write.
        self.expire()
        previous = self._by_id.get(registration.instance_id)
        if previous is None and len(self._by_id) >= self._max_entries:
            raise RegistryFull(
                "id",
                f"the registry holds its maximum of {self._max_entries} entries; "
                "one leaves when it is deregistered or stops sending heartbeats",
            )
        now = self._clock()
        same_service = previous is not None and previous.name == registration.name
        entry = Entry(
            registration=registration,
            address=address,
            health_address=health_address,
            registered_at=previous.registered_at if previous is not None and same_service else now,
            last_heartbeat=now,
            expires_at=now + registration.ttl,
            wall_offset=self._wall_clock() - now,
        )
        if previous is not None and not same_service:
            self._remove(previous)
            self._notify(previous.name)
        self._store(entry)
        unchanged = (
            previous is not None
            and same_service
            and (previous.registration, previous.address, previous.health_address)
            == (registration, address, health_address)
        )
        if not unchanged:
            self._notify(registration.name)
        return entry

    def heartbeat(self, instance_id: str) -> bool:
        """Extends the entry by its ttl from now; False if there is no live entry of that id (an
        expired one is not revived: it must register again)."""
        entry = self._by_id.get(instance_id)
        now = self._clock()
        if entry is None or entry.expired(now):
            return False
        self._store(
            replace(
                entry,
                last_heartbeat=now,
                expires_at=now + entry.registration.ttl,
                wall_offset=self._wall_clock() - now,
            )
        )
        return True

    def deregister(self, instance_id: str) -> bool:
        """Removes the entry; False if there was no live entry of that id."""
        entry = self._by_id.get(instance_id)
        if entry is None:
            return False
        self._remove(entry)
        self._notify(entry.name)
        return not entry.expired(self._clock())

    def expire(self) -> list[Entry]:
        """Removes and returns the entries whose ttl has passed."""
        now = self._clock()
        gone = [entry for entry in self._by_id.values() if entry.expired(now)]
        for entry in gone:
            self._remove(entry)
        for name in sorted({entry.name for entry in gone}):
            self._notify(name)
        return gone

    def endpoints(self, service: str) -> list[Entry]:
        """The live entries of ``service``, by id."""
        now = self._clock()
        entries = self._by_service.get(service, {}).values()
        return sorted((entry for entry in entries if not entry.expired(now)), key=lambda entry: entry.id)

    def entries(self) -> list[Entry]:
        """Every live entry, by service name and id."""
        now = self._clock()
        live = (entry for entry in self._by_id.values() if not entry.expired(now))
        return sorted(live, key=lambda entry: (entry.name, entry.id))

    def _store(self, entry: Entry) -> None:
        self._by_id[entry.id] = entry
        self._by_service.setdefault(entry.name, {})[entry.id] = entry

    def _remove(self, entry: Entry) -> None:
        del self._by_id[entry.id]
        service = self._by_service[entry.name]
        del service[entry.id]
        if not service:
            del self._by_service[entry.name]

    def _notify(self, name: str) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(name)
        except Exception:
            # A listener's failure must not undo or block the registry's own change.
            log.exception("discovery: on_change failed for service %s", name)


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis glob pattern (SCAN MATCH)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _check_pattern(field: str, value: str, pattern: str) -> None:
    if not isinstance(value, str) or not re.match(pattern, value):
        raise RegistrationError(field, f"does not match {pattern}")


class _Skipped(Exception):
    """A Redis entry that the reader leaves out, and why."""


class RedisServiceSource:
    """Registrations that services write to Redis themselves (the format: docs/discovery.md).

    ``read()`` takes every live one, checked as the admin API checks them: an entry that is not
    a valid registration, whose key does not match its name and id, that has no expiry or whose
    address is not allowed is left out and logged (once per key and value), never an error of the
    reader. A Redis that cannot be reached raises redis-py's error, so the caller keeps what it
    read last."""

    def __init__(
        self,
        url: str,
        allowed_networks: Sequence[IPNetwork],
        prefix: str = "apigate:",
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        scan_count: int = SCAN_COUNT,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
        )
        self._allowed = tuple(allowed_networks)
        self._prefix = prefix
        self._pattern = _glob_escape(prefix) + "service:*"
        self._clock = clock
        self._wall_clock = wall_clock
        self._scan_count = scan_count
        self._max_entries = max_entries
        self._refused: dict[bytes, bytes | None] = {}  # key -> the value left out, logged once
        self._over_cap = False  # more keys than max_entries at the last read: logged once

    def set_allowed(self, allowed_networks: Sequence[IPNetwork]) -> None:
        """The allow-list of a reloaded config: every ``read()`` from now on checks against it."""
        self._allowed = tuple(allowed_networks)

    def key(self, name: str, instance_id: str) -> str:
        """The key of one instance: ``{prefix}service:{name}:{id}``."""
        _check_pattern("name", name, NAME_PATTERN)
        _check_pattern("id", instance_id, ID_PATTERN)
        return f"{self._prefix}service:{name}:{instance_id}"

    async def write(self, registration: Registration) -> None:
        """SET the registration with PX its ttl, after the check every reader makes (so a writer
        hears at once that its address is refused)."""
        await admit(registration, self._resolver(asyncio.get_running_loop()))
        key = self.key(registration.name, registration.instance_id)
        await self._client.set(key, registration.to_json(), px=_milliseconds(registration.ttl))

    async def heartbeat(self, name: str, instance_id: str, ttl: float) -> bool:
        """PEXPIRE the instance's key by ``ttl`` seconds; False if it has expired or never was."""
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not MIN_TTL <= ttl <= MAX_TTL:
            raise RegistrationError("ttl", f"must be a number of seconds from {MIN_TTL:g} to {MAX_TTL:g}")
        return bool(await self._client.pexpire(self.key(name, instance_id), _milliseconds(ttl)))

    async def delete(self, name: str, instance_id: str) -> bool:
        """DEL the instance's key; False if there was none."""
        return bool(await self._client.delete(self.key(name, instance_id)))

    async def read(self) -> dict[str, list[Entry]]:
        """Every live, valid and allowed registration, by service name (each list by id)."""
        keys = await self._scan()
        over_cap = len(keys) > self._max_entries
        if over_cap and not self._over_cap:
            log.warning(
                "discovery: Redis holds more than %d registrations; reading %d of them (max_entries)",
                self._max_entries,
                self._max_entries,
            )
        self._over_cap = over_cap
        keys = keys[: self._max_entries]
        values = await self._fetch(keys)
        now = self._clock()
        resolve = self._resolver(asyncio.get_running_loop())
        found = await asyncio.gather(
            *(
                self._entry(key, value, pttl, now, resolve)
                for key, (value, pttl) in zip(keys, values, strict=True)
            )
        )
        refused: dict[bytes, bytes | None] = {}
        services: dict[str, list[Entry]] = {}
        for key, (value, _), outcome in zip(keys, values, found, strict=True):
            if isinstance(outcome, Entry):
                services.setdefault(outcome.name, []).append(outcome)
            elif outcome is not None:
                refused[key] = value
                if key not in self._refused or self._refused[key] != value:
                    log.warning("discovery: ignoring Redis key %s: %s", key.decode(errors="replace"), outcome)
        self._refused = refused
        return {
            name: sorted(entries, key=lambda entry: entry.id) for name, entries in sorted(services.items())
        }

    async def close(self) -> None:
        await self._client.aclose()

    async def _scan(self) -> list[bytes]:
        """The keys of registrations, one more than ``max_entries`` at the most (SCAN may repeat a
        key: each is kept once)."""
        keys: dict[bytes, None] = {}
        scan = self._client.scan_iter(match=self._pattern, count=self._scan_count)
        try:
            async for key in scan:
                keys[key] = None
                if len(keys) > self._max_entries:
                    break
        finally:
            await scan.aclose()
        return list(keys)

    async def _fetch(self, keys: list[bytes]) -> list[tuple[bytes | None, int]]:
        """Each key's value and remaining time to live (ms), by pipelines of ``scan_count`` keys."""
        values: list[tuple[bytes | None, int]] = []
        for start in range(0, len(keys), self._scan_count):
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys[start : start + self._scan_count]:
                    pipe.get(key)
                    pipe.pttl(key)
                replies = await pipe.execute()
            values.extend(zip(replies[::2], replies[1::2], strict=True))
        return values

    def _resolver(self, loop: asyncio.AbstractEventLoop) -> Resolve:
        """Resolves each host once per call of ``read()``, however many entries name it."""
        pending: dict[tuple[str, str], asyncio.Future[str]] = {}

        def resolve(host: str, field: str) -> Awaitable[str]:
            if (host, field) not in pending:
                pending[host, field] = asyncio.ensure_future(
                    resolve_allowed(host, self._allowed, loop, field)
                )
            return pending[host, field]

        return resolve

    async def _entry(
        self, key: bytes, value: bytes | None, pttl: int, now: float, resolve: Resolve
    ) -> Entry | str | None:
        """The key's entry, or why it is left out (None: it expired while being read)."""
        if value is None or pttl == -2:
            return None
        try:
            registration = self._registration(key, value, pttl)
            address, health_address = await admit(registration, resolve)
        except (_Skipped, RegistrationError) as exc:
            return str(exc)
        return Entry(
            registration=registration,
            address=address,
            health_address=health_address,
            registered_at=None,
            last_heartbeat=None,
            expires_at=now + pttl / 1000,
            wall_offset=self._wall_clock() - now,
        )

    def _registration(self, key: bytes, value: bytes, pttl: int) -> Registration:
        if pttl < 0:
            raise _Skipped("it has no expiry: write it with SET key value PX ttl_ms")
        try:
            registration = parse_registration(orjson.loads(value))
        except orjson.JSONDecodeError:
            raise _Skipped("its value is not JSON") from None
        expected = f"{self._prefix}service:{registration.name}:{registration.instance_id}"
        if key != expected.encode():
            raise _Skipped(
                f"a registration of {registration.name} with id {registration.instance_id} "
                f"belongs at {expected}"
            )
        return registration
