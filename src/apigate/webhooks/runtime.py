"""What a gateway process runs for webhooks: the compiled sources, the group-commit writer for
accepted events, the delivery worker and the outbound HTTP client. One per process, started as a
shared service (``Services.webhooks``) and kept across reloads; a reload swaps sources and
destinations without dropping events or deliveries in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from apigate.outbound import HttpClient, OutboundError
from apigate.store.groupcommit import GroupCommit
from apigate.store.roles.webhooks import NewWebhookEvent
from apigate.webhooks.config import SourceConfig, WebhooksConfig
from apigate.webhooks.delivery import DeliveryStore, DeliveryWorker, Lane
from apigate.webhooks.destinations import Destination, Message, build_destination
from apigate.webhooks.destinations.http import HttpDestination
from apigate.webhooks.destinations.redis_streams import RedisConnections
from apigate.webhooks.outcomes import Handled, Refused, Stored
from apigate.webhooks.pollers import PUSH_REFUSED, PolledEvent, Pollers, PollerStore
from apigate.webhooks.signing import Signer, signing_secret_in_effect
from apigate.webhooks.tracing import DeliverySpans
from apigate.webhooks.verify.model import Verifier
from apigate.webhooks.verify.schemes import build_verifier

log = logging.getLogger("apigate.webhooks")

# Request headers not kept for delivery: framing and hop-by-hop ones, what proxies add, the
# client's credentials, and the Standard Webhooks names the gateway signs with itself.
DROPPED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "proxy-authorization",
        "proxy-connection",
        "authorization",
        "cookie",
        "forwarded",
        "via",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "svix-id",
        "svix-timestamp",
        "svix-signature",
    }
)
# The gateway's own headers on deliveries (x-apigate-source, -attempt, -event-type).
GATEWAY_HEADER_PREFIX = "x-apigate-"


@dataclass(frozen=True, slots=True)
class Source:
    """A source compiled for intake: its verifier and where its events go."""

    name: str
    config: SourceConfig
    verifier: Verifier

    def destinations_for(self, event_type: str | None) -> tuple[str, ...]:
        return tuple(d.name for d in self.config.destinations if d.wants(event_type))


def kept_headers(
    headers: list[tuple[bytes, bytes]], credentials: frozenset[str]
) -> tuple[tuple[str, str], ...]:
    """The headers stored and passed on: not the dropped ones, not the headers that carried the
    source's secret (``credentials``), and none a sender could use to pass as the gateway."""
    kept = []
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1")
        if name in DROPPED_HEADERS or name in credentials or name.startswith(GATEWAY_HEADER_PREFIX):
            continue
        kept.append((name, raw_value.decode("latin-1")))
    return tuple(kept)


def content_event_id(body: bytes) -> str:
    """The id of an event whose provider gives none: the same bytes are the same event."""
    return "sha256:" + hashlib.sha256(body).hexdigest()


BACKLOG_EVERY = 5.0


class WebhookRuntimeStore(DeliveryStore, PollerStore, Protocol):
    """Intake commits events, delivery claims them, pollers lease sources; the signing secret is
    a setting."""


class WebhookRuntime:
    def __init__(
        self, store: WebhookRuntimeStore, config: WebhooksConfig, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.clock = clock
        self.config = config
        self.sources: dict[str, Source] = {}
        self.destinations: dict[str, Destination] = {}
        self.client = HttpClient(max_connections_per_origin=_connections(config))
        self.redis = RedisConnections()
        self.pollers = Pollers(store, self.client, self.commit_polled, clock)
        self.signer: Signer | None = None
        self.worker: DeliveryWorker | None = None
        self.spans: DeliverySpans | None = None  # traces delivery attempts while span export may be on
        self._events: GroupCommit[NewWebhookEvent, bool] = GroupCommit(store.add_webhook_events)
        # For metrics: events taken in, by (source, outcome); deliveries waiting and dead, as the
        # store last counted them (every BACKLOG_EVERY seconds), by (source, destination, state).
        self.received: dict[tuple[str, str], int] = {}
        self.backlog: list[tuple[str, str, str, int]] = []
        self.backlog_counted_at = 0.0
        self._backlog_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        secret = await signing_secret_in_effect(self.config.signing_secret, self.store)
        self.signer = Signer(secret.value)
        self.worker = DeliveryWorker(
            self.store,
            self.signer,
            self.config.poll_interval,
            self.clock,
            intake_busy=lambda: self._events.busy,
        )
        self.worker.spans = self.spans
        self.apply_config(self.config)
        self.worker.start()
        self._backlog_task = asyncio.get_running_loop().create_task(self._count_backlog())

    async def _count_backlog(self) -> None:
        while True:
            try:
                self.backlog = await self.store.count_webhook_backlog()
                self.backlog_counted_at = self.clock()
            except Exception as exc:  # the store is down: the last count stays, with its time
                log.warning("counting the webhook backlog failed: %s", exc)
            await asyncio.sleep(BACKLOG_EVERY)

    def metrics(self) -> dict[str, Any]:
        """Counts for the node's merged metrics (observe/metrics.py merges them)."""
        attempts = self.worker.attempts if self.worker is not None else {}
        return {
            "received": [[source, outcome, n] for (source, outcome), n in self.received.items()],
            "deliveries": [[*key, n] for key, n in attempts.items()],
            "backlog": [list(row) for row in self._backlog_with_zeros()],
            "counted_at": self.backlog_counted_at,
        }

    def trace_deliveries(self, spans: DeliverySpans) -> None:
        self.spans = spans
        if self.worker is not None:
            self.worker.spans = spans

    def apply_config(self, config: WebhooksConfig) -> None:
        """Compile sources and destinations (a verifier per source, a sender per destination)."""
        if config.signing_secret != self.config.signing_secret:
            log.warning("webhooks.signing_secret changes take effect after a restart, not a reload")
        self.config = config
        self.sources = {
            name: Source(name, source, build_verifier(source.verify) if source.verify else PUSH_REFUSED)
            for name, source in config.sources.items()
        }
        self.destinations = {
            name: build_destination(d, self.client, self.redis) for name, d in config.destinations.items()
        }
        if self.worker is not None:
            self.worker.poll_interval = config.poll_interval
            self.worker.configure(
                {
                    name: Lane(
                        self.destinations[name],
                        d.retry,
                        d.concurrency,
                        d.rate,
                        disable_after=d.disable_after,
                        fifo_sources=fifo_sources(config, name),
                    )
                    for name, d in config.destinations.items()
                },
                {name: source.dedupe.retention for name, source in config.sources.items()},
            )
        self.pollers.configure({name: s.poll for name, s in config.sources.items() if s.poll is not None})

    def _backlog_with_zeros(self) -> list[tuple[str, str, str, int]]:
        """The store's counts, and 0 for each configured source and destination it has none of
        (a gauge with no series cannot be alerted on when it first rises)."""
        counted = {(source, destination, state) for source, destination, state, _n in self.backlog}
        zeros = [
            (name, target.name, state, 0)
            for name, source in self.sources.items()
            for target in source.config.destinations
            for state in ("pending", "dead")
            if (name, target.name, state) not in counted
        ]
        return [*self.backlog, *zeros]

    async def stop(self) -> None:
        if self._backlog_task is not None:
            self._backlog_task.cancel()
        await self.pollers.stop()  # first: a poll commits through the group commit below
        await self._events.close()
        if self.worker is not None:
            await self.worker.stop()
        await self.client.close()
        await self.redis.close()

    # -- intake ----------------------------------------------------------------------------------
    async def accept(
        self,
        source: Source,
        event_id: str | None,
        event_type: str | None,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> Stored | Refused:
        """Commit a verified event (grouped with others); Stored only once it is durable."""
        now = self.clock()
        event = NewWebhookEvent(
            source=source.name,
            event_id=event_id or content_event_id(body),
            event_type=event_type,
            received_at=now,
            headers=kept_headers(headers, source.verifier.credential_headers),
            body=body,
            destinations=source.destinations_for(event_type),
            first_due=now,
        )
        try:
            new = await self._events.submit(event)
        except Exception:
            log.exception("webhook event of source %s could not be stored", source.name)
            return Refused("not_stored")
        if new and self.worker is not None:
            self.worker.wake()
        outcome = "accepted" if new else "duplicate"
        self._count_received(source.name, outcome)
        return Stored(outcome, event.event_id)

    async def forward(
        self, source: Source, event_id: str | None, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Handled | Refused:
        """Synchronous mode: send to the source's one destination now; Handled carries its reply."""
        assert self.signer is not None
        destination = self.destinations[source.config.destinations[0].name]
        assert isinstance(destination, HttpDestination)  # the config allows only http for sync sources
        message_id = event_id or content_event_id(body)
        kept = kept_headers(headers, source.verifier.credential_headers)
        sent_headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in kept]
        sent_headers += self.signer.headers(message_id, int(self.clock()), body)
        sent_headers.append((b"x-apigate-source", source.name.encode()))
        try:
            response = await destination.send(Message(sent_headers, body))
        except OutboundError as exc:
            return Refused(exc.kind)
        except ValueError:  # a header the outbound client will not send
            return Refused("unsendable")
        content_type = response.header(b"content-type") or b"application/octet-stream"
        return Handled(response.status, response.body, content_type)

    # -- polled sources (webhooks/pollers): fetched events take the intake's group commit -----------
    async def commit_polled(self, source_name: str, events: Sequence[PolledEvent]) -> None:
        source = self.sources[source_name]
        now = self.clock()
        submitted = [
            self._events.submit(
                NewWebhookEvent(
                    source=source_name,
                    event_id=event.event_id,
                    event_type=event.event_type,
                    received_at=now,
                    headers=event.headers,
                    body=event.body,
                    destinations=source.destinations_for(event.event_type),
                    first_due=now,
                )
            )
            for event in events
        ]
        stored = await asyncio.gather(*submitted)
        for new in stored:
            self._count_received(source_name, "accepted" if new else "duplicate")
        if any(stored) and self.worker is not None:
            self.worker.wake()

    def _count_received(self, source: str, outcome: str) -> None:
        self.received[(source, outcome)] = self.received.get((source, outcome), 0) + 1


def fifo_sources(config: WebhooksConfig, destination: str) -> frozenset[str]:
    """The sources whose events ``destination`` takes one at a time, in order (``fifo: true``)."""
    return frozenset(
        name
        for name, source in config.sources.items()
        if any(wanted.name == destination and wanted.fifo for wanted in source.destinations)
    )


def _connections(config: WebhooksConfig) -> int:
    return max((d.concurrency for d in config.destinations.values()), default=10)
