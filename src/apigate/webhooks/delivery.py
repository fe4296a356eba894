"""The delivery worker: claim due deliveries, send them, record every attempt, retry or dead-letter.

Runs inside every gateway process. Who may claim depends on the store:

- PostgreSQL: every process of every node claims (``FOR UPDATE SKIP LOCKED`` gives each due row to
  one claimer); a claim is a committed lease, so a node that dies mid-attempt holds its rows only
  until the lease runs out, and another node then makes the next attempt.
- SQLite: one process owns delivery through a lease row that it renews while it lives; the others
  ingest only. When the owner dies its lease expires and another process (or its restart) takes it.

A claim counts the attempt before anything is sent, so an attempt cut short by a crash is never
repeated under the same number: a handler that records ``webhook-id`` and the attempt number sees
attempt 1 of an event at most once, and any repeat carries a higher number. Delivery is at least
once; ``webhook-id`` is the key a handler de-duplicates on.

Intake comes first: while events are being committed, each destination keeps only a share of its
concurrency in flight, so a burst is acknowledged quickly and delivered just after.

A destination whose attempts have all failed for its ``disable_after`` is disabled in the store (no
process claims for it until it is enabled again), and a FIFO source's events are claimed one at a
time (the store hands out only the oldest pending one); see docs/webhooks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from apigate.store.groupcommit import GroupCommit
from apigate.store.roles.leases import LeaseStore
from apigate.store.roles.webhooks import DeliveryClaim, DeliveryOutcome, WebhookStore
from apigate.webhooks.config import RetryConfig
from apigate.webhooks.destinations.base import Destination, Message, Result
from apigate.webhooks.signing import Signer
from apigate.webhooks.tracing import AttemptTrace, DeliverySpans

log = logging.getLogger("apigate.webhooks")

OWNER_LEASE = "webhook-delivery"
OWNER_LEASE_SECONDS = 10.0
CLAIM_MARGIN = 5.0  # a claim lasts the destination's timeout plus this
STOP_GRACE = 5.0  # attempts in flight at shutdown get this long; the rest are retried after their lease
PURGE_EVERY = 3600.0
# While intake is busy a lane keeps this many times fewer attempts in flight: the provider is
# waiting for the intake's answer (and gives up on a slow one), a handler can wait a little longer.
INTAKE_FIRST_SHARE = 4


@dataclass(slots=True)
class Lane:
    """One destination as the worker drives it: its sender, retry schedule and limits."""

    destination: Destination
    retry: RetryConfig
    concurrency: int
    rate: tuple[float, float] | None = None  # (attempts, per seconds)
    disable_after: float = 0.0  # seconds of nothing but failures before it is disabled; 0: never
    fifo_sources: frozenset[str] = frozenset()  # sources whose events it takes one at a time, in order
    in_flight: int = 0
    tokens: float = 0.0
    refilled_at: float = 0.0

    def free_slots(self, now: float, share: int = 1) -> int:
        """Attempts to start now: within a 1/share part of the concurrency and the rate limit."""
        free = max(1, self.concurrency // share) - self.in_flight
        if self.rate is None:
            return free
        count, per = self.rate
        self.tokens = min(count, self.tokens + (now - self.refilled_at) * count / per)
        self.refilled_at = now
        return min(free, int(self.tokens))

    def took(self, claimed: int) -> None:
        if self.rate is not None:
            self.tokens -= claimed


def delivery_message(
    claim: DeliveryClaim, signer: Signer, now: float, trace: AttemptTrace | None = None
) -> Message:
    """The kept request headers, the gateway's Standard Webhooks headers and the attempt number;
    with ``trace``, a traceparent naming the attempt's span instead of the sender's."""
    headers = [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in claim.headers
        if trace is None or name.lower() != "traceparent"
    ]
    if trace is not None:
        headers.append((b"traceparent", trace.traceparent()))
    headers += signer.headers(claim.event_id, int(now), claim.body)
    headers += [(b"x-apigate-source", claim.source.encode()), (b"x-apigate-attempt", b"%d" % claim.attempt)]
    if claim.event_type is not None:
        headers.append((b"x-apigate-event-type", claim.event_type.encode("latin-1", "replace")))
    return Message(headers, claim.body)


class DeliveryStore(WebhookStore, LeaseStore, Protocol):
    """Deliveries to claim and record, and the owner lease where one process must deliver."""


class DeliveryWorker:
    def __init__(
        self,
        store: DeliveryStore,
        signer: Signer,
        poll_interval: float,
        clock: Callable[[], float] = time.time,
        jitter_random: Callable[[], float] = random.random,
        intake_busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.signer = signer
        self.poll_interval = poll_interval
        self.clock = clock
        self._random = jitter_random
        self._intake_busy = intake_busy
        self.holder = uuid.uuid4().hex
        self.lanes: dict[str, Lane] = {}
        self.retention: dict[str, float] = {}  # source -> seconds an event is kept once done
        self._outcomes: GroupCommit[DeliveryOutcome, None] = GroupCommit(self._record)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._attempts: set[asyncio.Task[None]] = set()
        self._owner_until = 0.0
        self._purge_at = 0.0
        self._failed_since_check: set[str] = set()  # destinations with a failed attempt not yet checked
        self._report_due = True  # report disabled and removed destinations (at start and reload)
        self.attempts: dict[tuple[str, str, str], int] = {}  # (source, destination, outcome) -> attempts
        self.spans: DeliverySpans | None = None  # set while span export may be on

    def configure(self, lanes: dict[str, Lane], retention: dict[str, float]) -> None:
        """Take a new set of destinations (a reload); attempts in flight finish on their old lane."""
        for name, lane in lanes.items():
            old = self.lanes.get(name)
            if old is not None:
                lane.in_flight, lane.tokens, lane.refilled_at = old.in_flight, old.tokens, old.refilled_at
        self.lanes = lanes
        self.retention = retention
        self._report_due = True
        self.wake()

    def wake(self) -> None:
        """Look for due deliveries now (an event was committed, or a slot came free)."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._attempts:
            _, late = await asyncio.wait(self._attempts, timeout=STOP_GRACE)
            for task in late:
                task.cancel()
        await self._outcomes.close()

    # -- the loop ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                if await self._may_deliver():
                    await self._report_if_due()
                    await self._claim_due()
                    await self._disable_failing()
                    await self._purge_if_due()
            except Exception:
                log.exception("webhook delivery: the store failed; trying again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()

    async def _may_deliver(self) -> bool:
        if not self.store.delivery_needs_owner:
            return True
        now = self.clock()
        # Renewed when a third of the lease is used up, so a live owner never lets it lapse.
        if now < self._owner_until - OWNER_LEASE_SECONDS * 2 / 3:
            return True
        owner = await self.store.take_lease(OWNER_LEASE, self.holder, now, now + OWNER_LEASE_SECONDS)
        if owner and self._owner_until <= now:
            log.info("webhook delivery: this process delivers (holder %s)", self.holder)
        self._owner_until = now + OWNER_LEASE_SECONDS if owner else 0.0
        return owner

    async def _claim_due(self) -> None:
        share = INTAKE_FIRST_SHARE if self._intake_busy() else 1
        for name, lane in list(self.lanes.items()):
            now = self.clock()
            free = lane.free_slots(now, share)
            if free <= 0:
                continue
            lease_until = now + lane.destination.timeout + CLAIM_MARGIN
            claims = await self.store.claim_webhook_deliveries(
                name, free, now, lease_until, lane.fifo_sources
            )
            lane.took(len(claims))
            for claim in claims:
                lane.in_flight += 1
                task = asyncio.get_running_loop().create_task(self._attempt(lane, claim))
                self._attempts.add(task)
                task.add_done_callback(self._attempts.discard)

    async def _disable_failing(self) -> None:
        """Disable the destinations whose attempts have all failed for their ``disable_after``; the
        store disables each once, so one process in the cluster logs it."""
        now = self.clock()
        failed = set(self._failed_since_check)
        cutoffs = {
            name: now - lane.disable_after
            for name in failed
            if (lane := self.lanes.get(name)) is not None and lane.disable_after > 0
        }
        disabled = await self.store.disable_failing_webhook_destinations(cutoffs, now) if cutoffs else []
        self._failed_since_check -= failed  # only once checked: a store error leaves them for the next round
        for name in disabled:
            log.error(
                "webhook destination %s disabled: every attempt has failed for more than %s; its "
                "deliveries stay pending. Fix it, then run `apigate webhooks destinations enable %s`",
                name,
                _readable_duration(now - cutoffs[name]),
                name,
            )

    async def _report_if_due(self) -> None:
        """Warn about destinations that hold deliveries back: disabled ones, and ones no longer in
        the config whose deliveries are still pending (nothing delivers them until it is back)."""
        if not self._report_due:
            return
        for state in await self.store.list_webhook_destinations():
            if state.name not in self.lanes and state.pending:
                log.warning(
                    "webhook destination %s is not in the config, but %d deliveries to it are pending; "
                    "add it back to deliver them (`apigate webhooks destinations` lists them)",
                    state.name,
                    state.pending,
                )
            elif state.name in self.lanes and state.disabled_at is not None:
                log.warning(
                    "webhook destination %s is disabled (%d deliveries pending); "
                    "`apigate webhooks destinations enable %s` resumes it",
                    state.name,
                    state.pending,
                    state.name,
                )
        self._report_due = False

    async def _purge_if_due(self) -> None:
        now = self.clock()
        if now < self._purge_at:
            return
        self._purge_at = now + PURGE_EVERY
        for source, retention in self.retention.items():
            purged = await self.store.purge_webhook_events(now - retention, source)
            if purged:
                log.info("webhook events: purged %d of source %s older than its retention", purged, source)

    # -- one attempt --------------------------------------------------------------------------------
    async def _attempt(self, lane: Lane, claim: DeliveryClaim) -> None:
        started = self.clock()
        began = time.monotonic()
        spans = self.spans
        trace = spans.begin(claim) if spans is not None else None
        try:
            result = await lane.destination.deliver(delivery_message(claim, self.signer, started, trace))
        except Exception as exc:
            log.exception("webhook delivery to %s failed inside the gateway", claim.destination)
            result = Result(False, error=f"gateway error: {type(exc).__name__}")
        if spans is not None and trace is not None:
            spans.end(trace, claim, result, started, self.clock())
        outcome = self._outcome(lane.retry, claim, result, started, time.monotonic() - began)
        key = (claim.source, claim.destination, "delivered" if result.delivered else "failed")
        self.attempts[key] = self.attempts.get(key, 0) + 1
        try:
            await self._outcomes.submit(outcome)
            if not result.delivered:
                self._failed_since_check.add(claim.destination)
        except Exception:
            # Not recorded: the claim's lease runs out and the next attempt goes out then.
            log.exception("webhook delivery: could not record attempt %d of a delivery", claim.attempt)
        finally:
            lane.in_flight -= 1
            self.wake()

    def _outcome(
        self, retry: RetryConfig, claim: DeliveryClaim, result: Result, started: float, latency: float
    ) -> DeliveryOutcome:
        now = self.clock()
        if result.delivered:
            state, next_at = "delivered", now
        elif claim.schedule_step >= len(retry.schedule):
            state, next_at = "dead", now
            log.warning(
                "webhook event %s of %s: dead after attempt %d to %s (%s)",
                claim.event_id,
                claim.source,
                claim.attempt,
                claim.destination,
                result.error,
            )
        else:
            delay = retry.schedule[claim.schedule_step] * (1 + retry.jitter * (2 * self._random() - 1))
            if result.retry_after is not None:
                delay = max(delay, result.retry_after)
            state, next_at = "pending", now + delay
        return DeliveryOutcome(
            claim.delivery_id,
            claim.destination,
            claim.attempt,
            started,
            latency,
            result.status,
            result.error,
            state,
            next_at,
            claim.attempt - claim.schedule_step,
        )

    async def _record(self, outcomes: Sequence[DeliveryOutcome]) -> list[None]:
        await self.store.record_webhook_outcomes(outcomes)
        return [None] * len(outcomes)


def _readable_duration(seconds: float) -> str:
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds:g} s"
