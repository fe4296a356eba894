"""The Redis state backend (redis-py asyncio with hiredis): state shared by every gateway process.

Connections are made lazily and remade after an outage, so an unreachable Redis never stops a
gateway from starting: an operation that cannot reach it within ``OPERATION_TIMEOUT`` raises
``StateUnavailable`` and its caller decides (see the README's state section). Scripts run with
EVALSHA, loaded on first use (one round trip per call). Each subscription keeps its own
connection, resubscribes after a loss with a growing delay, and tells its callback (None) when
it is lost and when it is live again, since Redis pub/sub drops messages sent while nobody
listens. A subscription counts as live only while Redis answers on it: the subscription must be
confirmed, and a PING after ``LIVENESS_PING_AFTER`` of silence answered, within
``OPERATION_TIMEOUT``, so a hung Redis (a stopped process, a peer gone without a reset, which
keep the connection open and silent) is noticed within ``LIVENESS_PING_AFTER + OPERATION_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from apigate.state.base import (
    NAMESPACE,
    Message,
    Script,
    StateBackend,
    StateUnavailable,
    Subscription,
    milliseconds,
)

log = logging.getLogger("apigate.state")

# A request waiting on Redis waits at most this long (connect or answer) before it is unavailable.
OPERATION_TIMEOUT = 1.0
# A subscription that heard nothing for this long pings Redis. Subscribers count on a live
# subscription to learn of changes (the consumer registry then polls the store only every 5 s),
# so a silent Redis must be found out quickly; one PING a second per idle process is cheap.
LIVENESS_PING_AFTER = 0.5
# Resubscribing after a loss waits this long at first, doubling up to the maximum.
RETRY_FIRST_DELAY = 0.2
RETRY_MAX_DELAY = 5.0
_LOST = (RedisConnectionError, RedisTimeoutError, OSError)
# What makes an operation unanswerable: a lost connection, and also an error reply (a read-only
# replica after a failover, OOM): callers get StateUnavailable and decide (503), never a 500.
_UNANSWERED = (RedisError, OSError)


def describe(url: str) -> str:
    """host:port/db of a Redis URL, for messages: never its password."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or ''}"


@contextlib.contextmanager
def _unavailable_on_loss(where: str) -> Iterator[None]:
    try:
        yield
    except _UNANSWERED as exc:
        raise StateUnavailable(f"Redis at {where}: {type(exc).__name__}: {exc}") from exc


class RedisSubscription(Subscription):
    def __init__(self, client: redis.Redis, channel: str, callback: Callable[[Message], None], where: str):
        self._client = client
        self._channel = channel
        self._callback = callback
        self._where = where
        self._active = False
        self._retry_delay = RETRY_FIRST_DELAY
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._listen(), name=f"redis-subscription-{channel}")

    @property
    def active(self) -> bool:
        return self._active

    async def close(self) -> None:
        task = self._task
        # A timeout inside redis-py can swallow a cancellation that races with it: repeat until done.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _listen(self) -> None:
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                await self._receive(pubsub)
            except _LOST as exc:
                if self._active or self._retry_delay == RETRY_FIRST_DELAY:
                    reason = f"{type(exc).__name__}: {exc}"
                    log.warning("no subscription to Redis at %s (%s); retrying", self._where, reason)
            except Exception:  # a bug must not end the subscription for good
                log.exception("the subscription to Redis at %s failed; retrying", self._where)
            finally:
                with contextlib.suppress(*_LOST):
                    await pubsub.aclose()
            if self._active:
                self._active = False
                self._callback(None)  # notices may be missed from now on: the subscriber falls back
            await asyncio.sleep(self._retry_delay)
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_DELAY)

    async def _receive(self, pubsub: PubSub) -> None:
        """Hand the channel's messages to the callback until Redis fails to answer in time."""
        loop = asyncio.get_running_loop()
        awaiting_answer, deadline = True, loop.time() + OPERATION_TIMEOUT  # the confirmation first
        while True:
            message = await pubsub.get_message(timeout=max(deadline - loop.time(), 0))
            if message is None:
                if loop.time() < deadline:
                    continue
                if awaiting_answer:
                    raise RedisTimeoutError(f"no answer within {OPERATION_TIMEOUT:g}s")
                await pubsub.ping()
                awaiting_answer, deadline = True, loop.time() + OPERATION_TIMEOUT
                continue
            awaiting_answer, deadline = False, loop.time() + LIVENESS_PING_AFTER
            if message["type"] == "subscribe":
                if self._retry_delay > RETRY_FIRST_DELAY:
                    log.warning("subscribed to Redis at %s again", self._where)
                self._active, self._retry_delay = True, RETRY_FIRST_DELAY
                self._callback(None)
            elif message["type"] == "message":
                self._callback(message["data"])


class RedisState(StateBackend):
    shared: ClassVar[bool] = True

    def __init__(self, url: str, namespace: str = NAMESPACE) -> None:
        super().__init__(namespace)
        self.url = url
        self.where = describe(url)
        self._client: redis.Redis | None = None
        self._subscriber: redis.Redis | None = None
        self._scripts: dict[Script, AsyncScript] = {}
        self._subscriptions: list[RedisSubscription] = []

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            raise RuntimeError("the Redis state backend is not open")
        return self._client

    async def open(self) -> None:
        self._client = redis.Redis.from_url(
            self.url, socket_timeout=OPERATION_TIMEOUT, socket_connect_timeout=OPERATION_TIMEOUT
        )
        # Subscriptions check that Redis answers themselves and resubscribe (no silent retry).
        self._subscriber = redis.Redis.from_url(
            self.url,
            socket_timeout=OPERATION_TIMEOUT,
            socket_connect_timeout=OPERATION_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            await self._client.ping()
        except _LOST as exc:
            log.warning(
                "Redis at %s is not answering (%s: %s); going on without it until it does",
                self.where,
                type(exc).__name__,
                exc,
            )

    async def close(self) -> None:
        for subscription in self._subscriptions:
            await subscription.close()
        self._subscriptions.clear()
        for client in (self._client, self._subscriber):
            if client is not None:
                await client.aclose()
        self._client = self._subscriber = None

    async def add_if_absent(self, key: str, ttl: float) -> bool:
        with _unavailable_on_loss(self.where):
            return bool(await self.client.set(self.key(key), b"1", px=milliseconds(ttl), nx=True))

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any] = ()) -> Any:
        registered = self._scripts.get(script)
        if registered is None:
            registered = self._scripts[script] = self.client.register_script(script.lua)
        with _unavailable_on_loss(self.where):
            return await registered(keys=[self.key(k) for k in keys], args=list(args))

    async def publish(self, channel: str, message: bytes) -> None:
        with _unavailable_on_loss(self.where):
            await self.client.publish(self.key(channel), message)

    async def subscribe(self, channel: str, callback: Callable[[Message], None]) -> Subscription:
        if self._subscriber is None:
            raise RuntimeError("the Redis state backend is not open")
        subscription = RedisSubscription(self._subscriber, self.key(channel), callback, self.where)
        self._subscriptions.append(subscription)
        return subscription
