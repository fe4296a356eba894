"""The store: entities that must survive restarts, behind one small async interface.

Two implementations share it: SQLite in WAL mode (embedded, the default) and PostgreSQL (a
cluster of gateways on several machines). The data plane never reads the store per request:
it keeps entities in process and refreshes them when ``change_version`` moves, which every
write advances (a change feed that works the same on both backends).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any


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


class Store(abc.ABC):
    """Async access to durable entities. Every write advances ``change_version``."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply schema migrations (versioned, idempotent)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- consumers ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def upsert_consumer(self, consumer: Consumer) -> None: ...

    @abc.abstractmethod
    async def get_consumer(self, consumer_id: str) -> Consumer | None: ...

    @abc.abstractmethod
    async def list_consumers(self, tenant: str | None = None) -> list[Consumer]: ...

    @abc.abstractmethod
    async def delete_consumer(self, consumer_id: str) -> bool:
        """Deletes the consumer and its keys; False if it did not exist."""

    # -- API keys -------------------------------------------------------------------------------
    @abc.abstractmethod
    async def add_key(self, key: ApiKey) -> None: ...

    @abc.abstractmethod
    async def update_key(self, key: ApiKey) -> None:
        """Replace a stored key's mutable fields (revoked_at, expires_at, scopes, ...)."""

    @abc.abstractmethod
    async def get_key(self, key_id: str) -> ApiKey | None: ...

    @abc.abstractmethod
    async def list_keys(self, consumer_id: str | None = None) -> list[ApiKey]: ...

    # -- change feed and settings -------------------------------------------------------------------
    @abc.abstractmethod
    async def change_version(self) -> int:
        """A number that grows with every write; readers reload when it moves."""

    @abc.abstractmethod
    async def get_setting(self, name: str) -> str | None: ...

    @abc.abstractmethod
    async def set_setting(self, name: str, value: str, only_if_absent: bool = False) -> str:
        """Store a setting; with only_if_absent the first writer wins. Returns the stored value."""
