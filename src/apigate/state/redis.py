"""The Redis state backend (redis-py asyncio with hiredis): state shared by every gateway process.

A URL names one Redis (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster
(``redis+cluster://host:port,host:port``: its startup nodes). Connections are made lazily and
remade after an outage, so an unreachable Redis never stops a gateway from starting: an
operation that cannot get its answer within ``OPERATION_TIMEOUT`` raises ``StateUnavailable``
and its caller decides (see the README's state section).

Operations are pipelined automatically: every call made in one turn of the event loop is queued,
and the batch goes out as one pipeline (on a cluster, one per node, sent together) when the loop
comes round, at most ``MAX_PIPELINE_COMMANDS`` to a pipeline. Under load a request then costs a
share of a round trip instead of one. Each call still gets its own answer or its own error; only
a lost connection (or a batch unanswered in time) fails every call that it carried. Scripts go as
EVALSHA of the SHA-1 of their Lua; one that Redis does not know (a restart or SCRIPT FLUSH emptied
its cache; on a cluster, a node that never ran it) answers NOSCRIPT and is sent again whole with
EVAL, which caches it there. Nothing is retried after it was sent: a script is not run twice.

Each subscription keeps its own connection (on a cluster, to one node: PUBLISH reaches every
node), resubscribes after a loss with a growing delay (on a cluster, to the next startup node),
and tells its callback (None) when it is lost and when it is live again, since Redis pub/sub
drops messages sent while nobody listens. A subscription counts as live only while Redis answers
on it: the subscription must be confirmed, and a PING after ``LIVENESS_PING_AFTER`` of silence
answered, within ``OPERATION_TIMEOUT``, so a hung Redis (a stopped process, a peer gone without a
reset, which keep the connection open and silent) is noticed within ``LIVENESS_PING_AFTER +
OPERATION_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
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
from apigate.state.resp import PipelinedConnection
from apigate.state.urls import CLUSTER_SCHEMES, parse_cluster_url

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
# One pipeline carries at most this many commands; a larger batch goes as several, sent together,
# so one huge reply never holds a connection (and the callers at its end) for long.
MAX_PIPELINE_COMMANDS = 512
CLOSED = "the state backend is closed"
_LOST = (RedisConnectionError, RedisTimeoutError, OSError)
# What makes an operation unanswerable: a lost connection or an unreachable cluster, and also an
# error reply (a read-only replica after a failover, OOM, a failing script): callers get
# StateUnavailable and decide (503), never a 500.
_UNANSWERED = (RedisError, RedisClusterException, OSError)


def describe(url: str) -> str:
    """host:port/db of a Redis URL (the startup nodes of a cluster's), for messages: never its password."""
    if url.startswith(CLUSTER_SCHEMES):
        return parse_cluster_url(url).describe()
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or ''}"


def unavailable(where: str, exc: BaseException) -> StateUnavailable:
    """A new error for one caller (each raise adds to its traceback), caused by ``exc``."""
    reason = f"no answer within {OPERATION_TIMEOUT:g}s" if isinstance(exc, TimeoutError) else str(exc)
    error = StateUnavailable(f"Redis at {where}: {type(exc).__name__}: {reason}")
    error.__cause__ = exc
    return error


class RedisSubscription(Subscription):
    """A subscription on one of ``clients`` (a cluster's startup nodes), the next one after each loss."""

    def __init__(
        self, clients: Sequence[redis.Redis], channel: str, callback: Callable[[Message], None], where: str
    ) -> None:
        self._clients = clients
        self._attempts = 0
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
            pubsub = self._clients[self._attempts % len(self._clients)].pubsub()
            self._attempts += 1
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


class _Call:
    """One queued operation: its command, its script (for a resend with EVAL), and its caller's future."""

    __slots__ = ("command", "future", "script")

    def __init__(self, command: tuple[Any, ...], script: Script | None, future: asyncio.Future[Any]) -> None:
        self.command = command
        self.script = script
        self.future = future

    def with_script_text(self) -> tuple[Any, ...]:
        """The command as EVAL with the whole script: what Redis runs (and caches) without its SHA."""
        assert self.script is not None
        return ("EVAL", self.script.lua, *self.command[2:])


class RedisState(StateBackend):
    shared: ClassVar[bool] = True

    def __init__(self, url: str, namespace: str = NAMESPACE) -> None:
        super().__init__(namespace)
        self.url = url
        self.where = describe(url)
        self._client: redis.Redis | RedisCluster | None = None
        self._subscribers: list[redis.Redis] = []
        self._shas: dict[Script, str] = {}
        self._subscriptions: list[RedisSubscription] = []
        self._queue: list[_Call] = []
        # Standalone servers: batches go over one pipelined connection of our own (state/resp.py);
        # a cluster's go through redis-py, which routes each command to its slot's node.
        self._connection: PipelinedConnection | None = None
        self._connecting: asyncio.Task[PipelinedConnection] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        # What the batching did, for tests and statistics: pipelines sent, commands in them.
        self.pipelines_sent = 0
        self.commands_sent = 0

    @property
    def client(self) -> redis.Redis | RedisCluster:
        if self._client is None:
            raise RuntimeError("the Redis state backend is not open")
        return self._client

    async def open(self) -> None:
        # No retry once a command is sent: a script must not run twice. A pooled connection
        # that died while idle is replaced when taken from the pool, before anything is sent.
        options: dict[str, Any] = {
            "socket_timeout": OPERATION_TIMEOUT,
            "socket_connect_timeout": OPERATION_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
        }
        if self.url.startswith(CLUSTER_SCHEMES):
            cluster = parse_cluster_url(self.url)
            logins: dict[str, Any] = {
                "username": cluster.username,
                "password": cluster.password,
                "ssl": cluster.tls,
            }
            nodes = [ClusterNode(host, port) for host, port in cluster.nodes]
            self._client = RedisCluster(startup_nodes=nodes, **logins, **options)
            self._subscribers = [redis.Redis(host=h, port=p, **logins, **options) for h, p in cluster.nodes]
        else:
            self._client = redis.Redis.from_url(self.url, **options)
            self._subscribers = [redis.Redis.from_url(self.url, **options)]
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT):
                await self._client.ping()
        except _UNANSWERED as exc:
            log.warning(
                "Redis at %s is not answering (%s: %s); going on without it until it does",
                self.where,
                type(exc).__name__,
                exc,
            )

    async def close(self) -> None:
        await self._flush_users()
        for subscription in self._subscriptions:
            await subscription.close()
        self._subscriptions.clear()
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        queued, self._queue = self._queue, []
        self._fail(queued, RuntimeError(CLOSED))
        for task in self._sending:
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)
        for client in (self._client, *self._subscribers):
            if client is not None:
                await client.aclose()
        self._client, self._subscribers = None, []

    async def add_if_absent(self, key: str, ttl: float) -> bool:
        return bool(await self._call(("SET", self.key(key), b"1", "PX", milliseconds(ttl), "NX")))

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any] = ()) -> Any:
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = hashlib.sha1(script.lua.encode()).hexdigest()
        full_keys = self.keys_of_one_call(keys)
        return await self._call(("EVALSHA", sha, len(full_keys), *full_keys, *args), script)

    async def publish(self, channel: str, message: bytes) -> None:
        await self._call(("PUBLISH", self.key(channel), message))

    async def subscribe(self, channel: str, callback: Callable[[Message], None]) -> Subscription:
        if not self._subscribers:
            raise RuntimeError("the Redis state backend is not open")
        subscription = RedisSubscription(self._subscribers, self.key(channel), callback, self.where)
        self._subscriptions.append(subscription)
        return subscription

    # -- auto-pipelining ---------------------------------------------------------------------------
    def _call(self, command: tuple[Any, ...], script: Script | None = None) -> asyncio.Future[Any]:
        """Queue ``command`` for this turn's pipeline; the future is its reply (or StateUnavailable)."""
        if self._client is None:
            raise RuntimeError("the Redis state backend is not open")
        loop = asyncio.get_running_loop()
        if not self._queue:
            loop.call_soon(self._flush)  # runs once every call of this turn has been queued
        future = loop.create_future()
        self._queue.append(_Call(command, script, future))
        return future

    def _flush(self) -> None:
        calls, self._queue = self._queue, []
        loop = asyncio.get_running_loop()
        for start in range(0, len(calls), MAX_PIPELINE_COMMANDS):
            task = loop.create_task(self._send(calls[start : start + MAX_PIPELINE_COMMANDS]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, calls: list[_Call]) -> None:
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT):
                replies = await self._pipeline([call.command for call in calls])
                unknown = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
                if unknown:
                    resent = await self._pipeline([calls[index].with_script_text() for index in unknown])
                    for index, reply in zip(unknown, resent, strict=True):
                        replies[index] = reply
        except _UNANSWERED as exc:
            self._fail(calls, exc)
            return
        except asyncio.CancelledError:
            self._fail(calls, RuntimeError(CLOSED))
            raise
        except Exception as exc:  # a bug: logged, and no caller waits forever
            log.exception("a pipeline to Redis at %s failed", self.where)
            self._fail(calls, exc)
            return
        for call, reply in zip(calls, replies, strict=True):
            if call.future.done():  # its caller was cancelled
                continue
            if isinstance(reply, _UNANSWERED):
                call.future.set_exception(unavailable(self.where, reply))
            else:
                call.future.set_result(reply)

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one pipeline; each reply, or the error it got, in order."""
        if not isinstance(self.client, RedisCluster):
            return await self._pipeline_direct(commands)
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        self.pipelines_sent += 1
        self.commands_sent += len(commands)
        return await pipe.execute(raise_on_error=False)

    async def _pipeline_direct(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        futures = connection.send(commands)
        self.pipelines_sent += 1
        self.commands_sent += len(commands)
        try:
            replies = await asyncio.gather(*futures, return_exceptions=True)
        except BaseException:
            # Not answered in time (or the caller gave up): replies may still come, so this
            # connection is ended and the next batch opens a new one.
            connection.close()
            raise
        for reply in replies:
            if isinstance(reply, RedisConnectionError):
                raise reply
        return replies

    async def _connect(self) -> PipelinedConnection:
        """The pipelined connection, opened once however many batches wait for it."""
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(
                PipelinedConnection.open(self.url, OPERATION_TIMEOUT)
            )
        connection = await asyncio.shield(self._connecting)
        self._connection = connection
        return connection

    def _fail(self, calls: list[_Call], cause: BaseException) -> None:
        for call in calls:
            if not call.future.done():
                call.future.set_exception(unavailable(self.where, cause))
