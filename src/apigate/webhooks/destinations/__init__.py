"""Where deliveries go: one small interface, one module per kind of destination.

A destination sends one message and says how it went; the delivery worker owns scheduling,
retries, concurrency and recording. HTTP endpoints (http.py) and Redis streams (redis_streams.py:
an acknowledged XADD counts as delivered).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apigate.outbound import HttpClient
    from apigate.webhooks.config import DestinationConfig
    from apigate.webhooks.destinations.redis_streams import RedisConnections


@dataclass(frozen=True, slots=True)
class Message:
    """What is delivered: the original body and kept headers plus the gateway's own headers."""

    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True, slots=True)
class Result:
    delivered: bool
    status: int | None = None  # the handler's HTTP status, if it answered
    error: str | None = None  # why it was not delivered, for people
    retry_after: float | None = None  # seconds the handler asked to wait


class Destination(abc.ABC):
    timeout: float
    """Longest one attempt takes; a claim outlives it, so no other process starts the same attempt."""

    @abc.abstractmethod
    async def deliver(self, message: Message) -> Result: ...


def build_destination(
    config: DestinationConfig, http_client: HttpClient, redis_connections: RedisConnections
) -> Destination:
    """The sender for one destination's config; the clients are the runtime's, kept across reloads."""
    # Imported here: each kind's module imports this one.
    if config.type == "redis_stream":
        from apigate.webhooks.destinations.redis_streams import RedisStreamDestination

        return RedisStreamDestination(config, redis_connections)
    from apigate.webhooks.destinations.http import HttpDestination

    return HttpDestination(config, http_client)
