"""Webhook events, their deliveries and attempts, and the destinations they go to.

One event per (source, event_id): the unique key is the de-duplication window (an event is kept
until purged). Each event has one delivery per destination; a delivery is what the delivery
worker claims, attempts and finally marks delivered or dead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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


class WebhookStore(Protocol):
    delivery_needs_owner: bool
    """True where one process must own delivery (SQLite: one writer per file); False where every
    process may claim (PostgreSQL: row claims with FOR UPDATE SKIP LOCKED)."""

    async def add_webhook_events(self, events: Sequence[NewWebhookEvent]) -> list[bool]:
        """Commit the events in one transaction; per event True if new, False if a duplicate
        (already stored, or earlier in the same batch). Returns only after the commit is durable."""

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

    async def record_webhook_outcomes(self, outcomes: Sequence[DeliveryOutcome]) -> None:
        """Record attempts and move their deliveries on (delivered, retry at next_at, dead), and
        each destination's health (last success, failing since, last error); one transaction. An
        outcome whose claim was lost (the lease expired and another took it) only records its
        attempt and the health."""

    async def disable_failing_webhook_destinations(
        self, failing_before: dict[str, float], now: float
    ) -> list[str]:
        """Disable each named destination whose attempts have all failed since before its time in
        ``failing_before``; returns the ones this call disabled (each is disabled by one call only)."""

    async def enable_webhook_destination(self, name: str, now: float) -> bool:
        """Enable a disabled destination, restart its failure clock and make its pending deliveries
        due now; False if it was not disabled."""

    async def list_webhook_destinations(self) -> list[WebhookDestinationState]:
        """Every destination with a recorded attempt, a disabled state or pending deliveries."""

    async def count_webhook_backlog(self) -> list[tuple[str, str, str, int]]:
        """(source, destination, state, deliveries) for the states pending and dead."""

    async def list_webhook_events(self, query: WebhookEventQuery) -> list[WebhookEventSummary]: ...

    async def get_webhook_event(self, source: str, event_id: str) -> WebhookEventDetail | None: ...

    async def replay_webhook_events(self, query: WebhookEventQuery, now: float) -> int:
        """Make every delivery of the matching events due now (delivered and dead ones too) and
        restart its retry schedule; attempt numbers go on from where they were. Returns how many
        events."""

    async def purge_webhook_events(self, received_before: float, source: str | None = None) -> int:
        """Delete events received before the time that have nothing left to deliver; their ids
        can then be accepted again. Returns how many."""
