"""Consumers and their API keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Consumer:
    """An identity that calls APIs: a person, a service, a partner."""

    id: str
    tenant: str | None = None
    groups: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    disabled: bool = False
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as stored: never the key itself, only its keyed hash and a display prefix."""

    id: str
    consumer_id: str
    hash: str  # hex HMAC-SHA256 of the full key under the gateway's key-hash secret
    prefix: str  # the first characters of the key, for people to recognise it ("ak_Xy12…")
    scopes: tuple[str, ...] = ()
    allowed_cidrs: tuple[str, ...] = ()
    time_windows: tuple[str, ...] = ()  # e.g. "mon-fri 08:00-18:00" in UTC; empty = any time
    expires_at: float | None = None  # unix seconds
    revoked_at: float | None = None  # unix seconds; a key rotated out gets a future revoked_at
    created_at: float = 0.0
    rotated_from: str | None = None  # id of the key this one replaced


class ConsumerStore(Protocol):
    """Consumers and the API keys they own; every write advances the change feed."""

    async def upsert_consumer(self, consumer: Consumer) -> None: ...

    async def get_consumer(self, consumer_id: str) -> Consumer | None: ...

    async def list_consumers(self, tenant: str | None = None) -> list[Consumer]: ...

    async def delete_consumer(self, consumer_id: str) -> bool:
        """Deletes the consumer and its keys; False if it did not exist."""

    async def add_key(self, key: ApiKey) -> None:
        """ValueError if another key has the same hash."""

    async def update_key(self, key: ApiKey) -> None:
        """Replace scopes, allowed_cidrs, time_windows, expires_at and revoked_at.

        id, consumer_id, hash, prefix, created_at and rotated_from are fixed at creation and
        ignored here. Raises KeyError if no key has this id.
        """

    async def get_key(self, key_id: str) -> ApiKey | None: ...

    async def list_keys(self, consumer_id: str | None = None) -> list[ApiKey]: ...
