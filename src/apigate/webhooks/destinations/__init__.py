"""Where deliveries go: one small interface, one module per kind of destination.

A destination sends one message and says how it went; the delivery worker owns scheduling,
retries, concurrency and recording. The interface and its values are in base.py, which each kind's
module imports; HTTP endpoints (http.py) and Redis streams (redis_streams.py: an acknowledged XADD
counts as delivered).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apigate.webhooks.destinations.base import Destination, Message, Result
from apigate.webhooks.destinations.http import HttpDestination
from apigate.webhooks.destinations.redis_streams import RedisConnections, RedisStreamDestination

if TYPE_CHECKING:
    from apigate.outbound import HttpClient
    from apigate.webhooks.config import DestinationConfig

__all__ = ["Destination", "Message", "Result", "build_destination"]


def build_destination(
    config: DestinationConfig, http_client: HttpClient, redis_connections: RedisConnections
) -> Destination:
    """The sender for one destination's config; the clients are the runtime's, kept across reloads."""
    if config.type == "redis_stream":
        return RedisStreamDestination(config, redis_connections)
    return HttpDestination(config, http_client)
