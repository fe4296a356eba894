"""The store: entities that must survive restarts, behind one small async interface.

Two implementations share it: SQLite in WAL mode (embedded, the default) and PostgreSQL (a
cluster of gateways on several machines). The data plane never reads the store per request:
it keeps entities in process and refreshes them when ``change_version`` moves, which every
write advances (a change feed that works the same on both backends).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
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


# -- revoked tokens (the jwt policy's jti denylist) ---------------------------------------------------
@dataclass(frozen=True, slots=True)
class RevokedToken:
    """A JWT refused by its ``jti``; ``expires_at`` is when the denial may end (the token's own
    expiry), None to keep it for good."""

    jti: str
    expires_at: float | None = None  # unix seconds
    reason: str | None = None
    created_at: float = 0.0


# -- credentials (client secrets and login passwords) ------------------------------------------------
CREDENTIAL_KINDS = ("secret", "password")


@dataclass(frozen=True, slots=True)
class Credential:
    """A consumer's client secret (kind "secret") or login password (kind "password", with its
    ``username``), kept only as an scrypt hash (see ``consumers/passwords.py``)."""

    consumer_id: str
    kind: str  # one of CREDENTIAL_KINDS
    hash: str
    username: str | None = None  # logins only; a username belongs to one consumer
    scopes: tuple[str, ...] = ()  # what tokens issued for it may carry (oauth2-token)
    created_at: float = 0.0

    @property
    def id(self) -> str:
        """What the credential is for; setting one with the same id replaces it."""
        return f"secret:{self.consumer_id}" if self.kind == "secret" else f"password:{self.username}"


# -- webhook entities --------------------------------------------------------------------------------
DELIVERY_STATES = ("pending", "delivered", "dead")
EVENT_STATES = ("pending", "delivered", "dead", "filtered")  # filtered: no destination wanted it


@dataclass(frozen=True, slots=True)
class NewWebhookEvent:
    """A verified event to commit, with the destinations it goes to (none: kept, not delivered)."""

    source: str
    event_id: str
    event_type: str | None
    received_at: float
    headers: tuple[tuple[str, str], ...]  # the request headers kept for delivery
    body: bytes
    destinations: tuple[str, ...]
    first_due: float  # when the first attempt is due


@dataclass(frozen=True, slots=True)
class DeliveryClaim:
    """A delivery claimed for one attempt: everything needed to send it."""

    delivery_id: int
    destination: str
    attempt: int  # 1 for the first attempt; counted at claim time, never reused
    schedule_step: int  # 1 for the first attempt since the event arrived or was last replayed
    source: str
    event_id: str
    event_type: str | None
    received_at: float
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    """How one attempt ended and what happens to its delivery next."""

    delivery_id: int
    destination: str
    attempt: int
    started_at: float
    latency: float  # seconds
    status: int | None  # HTTP status, None if no answer
    error: str | None
    state: str  # one of DELIVERY_STATES
    next_at: float  # when a pending delivery is due again
    schedule_start: int = 0  # the claim's (attempt - schedule_step): a replay since then moved it


@dataclass(frozen=True, slots=True)
class WebhookEventQuery:
    """A filter over stored events; None matches anything."""

    source: str | None = None
    state: str | None = None  # one of EVENT_STATES
    event_type: str | None = None
    received_after: float | None = None
    received_before: float | None = None
    event_id: str | None = None
    keys: tuple[tuple[str, str], ...] | None = None  # only these (source, event_id)
    limit: int | None = 100


@dataclass(frozen=True, slots=True)
class WebhookEventSummary:
    source: str
    event_id: str
    event_type: str | None
    received_at: float
    state: str  # one of EVENT_STATES, derived from its deliveries
    size: int  # body bytes


@dataclass(frozen=True, slots=True)
class WebhookAttempt:
    attempt: int
    started_at: float
    latency: float
    status: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    destination: str
    state: str
    attempts: int
    next_at: float
    attempt_log: tuple[WebhookAttempt, ...]


@dataclass(frozen=True, slots=True)
class WebhookDestinationState:
    """A destination as the store knows it: its health, whether it is disabled, its backlog."""

    name: str
    disabled_at: float | None = None  # None: enabled
    failing_since: float | None = None  # the first failed attempt after the last success; None: healthy
    last_success_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    pending: int = 0  # deliveries not yet delivered or dead


@dataclass(frozen=True, slots=True)
class WebhookEventDetail:
    summary: WebhookEventSummary
    headers: tuple[tuple[str, str], ...]
    body: bytes
    deliveries: tuple[WebhookDelivery, ...]


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

    # -- revoked tokens (jti denylist) ------------------------------------------------------------------
    @abc.abstractmethod
    async def revoke_token(self, token: RevokedToken) -> None:
        """Add a revoked jti, or replace its expires_at and reason; advances change_version."""

    @abc.abstractmethod
    async def list_revoked_tokens(self) -> list[RevokedToken]: ...

    @abc.abstractmethod
    async def purge_revoked_tokens(self, expired_before: float) -> int:
        """Delete entries that expired before this time; returns how many. Records no change: an
        expired entry denies nothing, so readers need not reload."""

    # -- credentials ------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def set_credential(self, credential: Credential) -> None:
        """Add a credential, or replace the one with its id; ValueError if its username belongs to
        another consumer."""

    @abc.abstractmethod
    async def list_credentials(self, consumer_id: str | None = None) -> list[Credential]: ...

    @abc.abstractmethod
    async def delete_credential(self, credential_id: str) -> bool:
        """False if no credential has this id."""

    # -- change feed and settings -------------------------------------------------------------------
    @abc.abstractmethod
    async def change_version(self) -> int:
        """A number that grows with every write; readers reload when it moves."""

    @abc.abstractmethod
    async def get_setting(self, name: str) -> str | None: ...

    @abc.abstractmethod
    async def set_setting(self, name: str, value: str, only_if_absent: bool = False) -> str:
        """Store a setting; with only_if_absent the first writer wins. Returns the stored value."""

    # -- webhooks: events, deliveries, attempts, leases ------------------------------------------------
    # One event per (source, event_id): the unique key is the de-duplication window (an event is
    # kept until purged). Each event has one delivery per destination; a delivery is what the
    # delivery worker claims, attempts and finally marks delivered or dead.

    delivery_needs_owner: bool = False
    """True where one process must own delivery (SQLite: one writer per file); False where every
    process may claim (PostgreSQL: row claims with FOR UPDATE SKIP LOCKED)."""

    @abc.abstractmethod
    async def add_webhook_events(self, events: Sequence[NewWebhookEvent]) -> list[bool]:
        """Commit the events in one transaction; per event True if new, False if a duplicate
        (already stored, or earlier in the same batch). Returns only after the commit is durable."""

    @abc.abstractmethod
    async def claim_webhook_deliveries(
        self,
        destination: str,
        limit: int,
        now: float,
        lease_until: float,
        fifo_sources: frozenset[str] = frozenset(),
    ) -> list[DeliveryClaim]:
        """Claim up to ``limit`` due deliveries to ``destination`` until ``lease_until``, and count
        the attempt: the claim commits before anything is sent, so a process that dies mid-delivery
        leaves an attempt number that the next claimer (after the lease expires) goes past. Nothing
        is claimed for a disabled destination. Of a source in ``fifo_sources`` only the oldest
        pending delivery (by the event's arrival) may be claimed, so its events go one at a time
        and in order, whichever process claims."""

    @abc.abstractmethod
    async def record_webhook_outcomes(self, outcomes: Sequence[DeliveryOutcome]) -> None:
        """Record attempts and move their deliveries on (delivered, retry at next_at, dead), and
        each destination's health (last success, failing since, last error); one transaction. An
        outcome whose claim was lost (the lease expired and another took it) only records its
        attempt and the health."""

    @abc.abstractmethod
    async def disable_failing_webhook_destinations(
        self, failing_before: dict[str, float], now: float
    ) -> list[str]:
        """Disable each named destination whose attempts have all failed since before its time in
        ``failing_before``; returns the ones this call disabled (each is disabled by one call only)."""

    @abc.abstractmethod
    async def enable_webhook_destination(self, name: str, now: float) -> bool:
        """Enable a disabled destination, restart its failure clock and make its pending deliveries
        due now; False if it was not disabled."""

    @abc.abstractmethod
    async def list_webhook_destinations(self) -> list[WebhookDestinationState]:
        """Every destination with a recorded attempt, a disabled state or pending deliveries."""

    @abc.abstractmethod
    async def take_lease(self, name: str, holder: str, now: float, until: float) -> bool:
        """Take or renew the lease ``name`` for ``holder`` until ``until``; False while another
        holder's lease has not expired."""

    @abc.abstractmethod
    async def list_webhook_events(self, query: WebhookEventQuery) -> list[WebhookEventSummary]: ...

    @abc.abstractmethod
    async def get_webhook_event(self, source: str, event_id: str) -> WebhookEventDetail | None: ...

    @abc.abstractmethod
    async def replay_webhook_events(self, query: WebhookEventQuery, now: float) -> int:
        """Make every delivery of the matching events due now (delivered and dead ones too) and
        restart its retry schedule; attempt numbers go on from where they were. Returns how many
        events."""

    @abc.abstractmethod
    async def purge_webhook_events(self, received_before: float, source: str | None = None) -> int:
        """Delete events received before the time that have nothing left to deliver; their ids
        can then be accepted again. Returns how many."""
