"""The node's side of request events: batches from every worker (observe/events.py) go to each
/api/events listener and, when ``events.redis`` is set, to a Redis stream (XADD with an
approximate MAXLEN, one pipeline per batch).

A listener that does not keep up loses events (its queue is bounded), and so does the Redis
stream when more than REDIS_BACKLOG events wait for it: events are a live view, never a queue
that could grow. What is lost is counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

import orjson
import redis.asyncio as redis
from redis.exceptions import RedisError

from apigate.config.events import EventsConfig

log = logging.getLogger("apigate")

LISTENER_QUEUE: Final = 1000  # events a slow listener may fall behind before it loses some
REDIS_BACKLOG: Final = 10_000  # events waiting for Redis (down or slow) before later ones are lost
END: Final[dict[str, Any]] = {}  # put in every queue when the node stops


class EventHub:
    def __init__(self, on_wanted: Callable[[bool], None]) -> None:
        """``on_wanted``: told whenever events become wanted (a listener, or Redis) or stop being."""
        self.on_wanted = on_wanted
        self.listeners: set[asyncio.Queue[dict[str, Any]]] = set()
        self.settings = EventsConfig()
        self.redis: redis.Redis | None = None
        self.lost = 0
        self.published = 0
        self._publishing: asyncio.Task[None] | None = None
        self._unpublished: list[dict[str, Any]] = []
        self._wanted = False

    @property
    def wanted(self) -> bool:
        return self.settings.enabled and (bool(self.listeners) or self.redis is not None)

    def configure(self, settings: EventsConfig) -> None:
        old = self.settings.redis
        self.settings = settings
        if settings.redis != old:
            if self.redis is not None:
                _in_background(self.redis.aclose())
            self.redis = redis.Redis.from_url(settings.redis.url) if settings.redis is not None else None
        self._changed()

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(LISTENER_QUEUE)
        self.listeners.add(queue)
        self._changed()
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self.listeners.discard(queue)
        self._changed()

    def _changed(self) -> None:
        wanted = self.wanted
        if wanted != self._wanted:
            self._wanted = wanted
            self.on_wanted(wanted)

    def publish(self, events: list[dict[str, Any]]) -> None:
        for queue in self.listeners:
            for event in events:
                try:
                    queue.put_nowait(event)
                except asyncio.QueueFull:
                    self.lost += 1
        if self.redis is not None:
            room = REDIS_BACKLOG - len(self._unpublished)
            self.lost += max(0, len(events) - room)  # Redis is far behind: these are not kept
            self._unpublished += events[: max(0, room)]
            if self._publishing is None or self._publishing.done():
                self._publishing = asyncio.get_running_loop().create_task(self._publish(self.redis))

    async def _publish(self, client: redis.Redis) -> None:
        """XADD what waits, one pipeline at a time, until nothing does."""
        while self._unpublished and self.settings.redis is not None:
            batch, self._unpublished = self._unpublished, []
            stream, max_length = self.settings.redis.stream, self.settings.redis.max_length
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for event in batch:
                        fields = {"type": event["type"], "data": orjson.dumps(event)}
                        pipe.xadd(stream, fields, maxlen=max_length, approximate=True)  # type: ignore[arg-type]
                    await pipe.execute()
                self.published += len(batch)
            except (RedisError, OSError) as exc:
                self.lost += len(batch)
                log.warning("events: publishing to the Redis stream %s failed: %s", stream, exc)

    async def close(self) -> None:
        for queue in self.listeners:
            while True:  # make room: the end must reach every listener
                try:
                    queue.put_nowait(END)
                    break
                except asyncio.QueueFull:
                    queue.get_nowait()
        if self._publishing is not None:
            await asyncio.wait([self._publishing], timeout=2.0)
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None


def _in_background(work: Any) -> None:
    task = asyncio.ensure_future(work)
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)


_RUNNING: set[asyncio.Future[Any]] = set()
