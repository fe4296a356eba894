"""Deliver by XADD to a Redis stream, so that queue-based consumers need no HTTP handler.

Each event becomes one stream entry with the fields ``webhook-id`` (the event id), ``source``,
``type`` (when the event has one), ``attempt``, ``body``, the gateway's Standard Webhooks
``webhook-timestamp`` and ``webhook-signature`` (a consumer may verify them as an HTTP handler
would), and the request headers the destination names. An XADD that Redis acknowledged is a
delivery; anything else (Redis down, a timeout, an error reply) is a failed attempt, retried on
the destination's schedule like any other.

Delivery is at least once. The one duplicate the gateway can prevent is a repeat of a publish
whose acknowledgement was lost (the connection dropped after Redis ran the XADD, or the gateway
died before recording it): one script checks a marker for the event id and adds the entry only
if the marker is absent, setting it for ``dedupe_window``; the check and the XADD are atomic.
Past the window, or if Redis loses the marker (a failover before replication), an event may
appear twice, so consumers de-duplicate by the ``webhook-id`` field as HTTP handlers do.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from apigate.webhooks.config import RedisStreamDestinationConfig
from apigate.webhooks.destinations.base import Destination, Message, Result

log = logging.getLogger("apigate.webhooks")

# The gateway's own delivery headers, and the entry field each one becomes.
_GATEWAY_HEADERS = {
    b"webhook-id": b"webhook-id",
    b"webhook-timestamp": b"webhook-timestamp",
    b"webhook-signature": b"webhook-signature",
    b"x-apigate-source": b"source",
    b"x-apigate-event-type": b"type",
    b"x-apigate-attempt": b"attempt",
}

# KEYS: the stream, the event's marker. ARGV: marker lifetime in ms (0: no marker), MAXLEN (0: no
# trim), then field, value, ... Returns {1, entry id} when added, {0, entry id} when the marker
# says this event is in the stream already.
_PUBLISH = """
local window = tonumber(ARGV[1])
if window > 0 then
  local published = redis.call('GET', KEYS[2])
  if published then return {0, published} end
end
local args = {KEYS[1]}
if ARGV[2] ~= '0' then
  table.insert(args, 'MAXLEN')
  table.insert(args, '~')
  table.insert(args, ARGV[2])
end
table.insert(args, '*')
for i = 3, #ARGV do table.insert(args, ARGV[i]) end
local id = redis.call('XADD', unpack(args))
if window > 0 then redis.call('SET', KEYS[2], id, 'PX', window) end
return {1, id}
"""


class RedisConnections:
    """One client (and its connection pool) per Redis URL, kept across reloads and closed at stop."""

    def __init__(self) -> None:
        self._clients: dict[str, redis.Redis] = {}

    def client(self, url: str) -> redis.Redis:
        client = self._clients.get(url)
        if client is None:
            # No retries inside the client: a failed attempt is the delivery worker's to retry,
            # on the destination's schedule, and is recorded as such.
            client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
            self._clients[url] = client
        return client

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


class RedisStreamDestination(Destination):
    def __init__(self, config: RedisStreamDestinationConfig, connections: RedisConnections) -> None:
        self.timeout = config.timeout
        self.stream = config.stream
        self._maxlen = config.maxlen or 0
        self._window_ms = int(config.dedupe_window * 1000)
        self._copied = {name.encode("latin-1") for name in config.headers}
        client = connections.client(config.url)
        self._publish = client.register_script(_PUBLISH)

    def entry(self, message: Message) -> list[bytes]:
        """The entry's fields and values, flattened: field, value, field, value, ..."""
        flat: list[bytes] = []
        for name, value in message.headers:
            field = _GATEWAY_HEADERS.get(name) or (name if name in self._copied else None)
            if field is not None:
                flat += (field, value)
        return [*flat, b"body", message.body]

    def marker(self, message: Message) -> str:
        """The key that remembers an event was published: per stream, source and event id. The
        stream's name is its hash tag, so both keys of the script live in one cluster slot."""
        headers = dict(message.headers)
        source = headers.get(b"x-apigate-source", b"").decode("latin-1")
        event_id = headers.get(b"webhook-id", b"").decode("latin-1")
        return f"apigate:published:{{{self.stream}}}:{source}:{event_id}"

    async def deliver(self, message: Message) -> Result:
        marker = self.marker(message)
        args: list[bytes | int] = [self._window_ms, self._maxlen, *self.entry(message)]
        try:
            async with asyncio.timeout(self.timeout):
                added, entry_id = await self._publish(keys=[self.stream, marker], args=args)
        except TimeoutError:
            return Result(False, error=f"timeout: Redis did not answer within {self.timeout:g}s")
        except (RedisError, OSError) as exc:
            return Result(False, error=f"redis: {type(exc).__name__}: {exc}")
        if not added:
            log.info("%s: published already as entry %s; not added again", marker, entry_id.decode())
        return Result(True)
