"""The Redis state backend (redis-py asyncio with hiredis): state shared by every gateway process.

A URL names one Redis (``redis://``, ``rediss://``, ``unix://``), a Redis Cluster
(``redis+cluster://host:port,host:port``: its startup nodes) or the master that Redis Sentinel
watches (``redis+sentinel://host:port,host:port/service``: the sentinels are asked for the master
for each new connection, and a connection that meets a read-only replica after a failover is
dropped so that the next one asks again). Connections are made lazily and
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
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from apigate.state.base import NAMESPACE, Message, Script, StateBackend, Subscription, milliseconds
from apigate.state.calls import OPERATION_TIMEOUT, Call, batched
from apigate.state.resp import PipelinedConnection, WriteCounts
from apigate.state.urls import (
    CLUSTER_SCHEMES,
    SENTINEL_SCHEMES,
    SentinelURL,
    parse_cluster_url,
    parse_sentinel_url,
)

log = logging.getLogger("apigate.state")
T = TypeVar("T")

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
    """host:port/db of a Redis URL (a cluster's startup nodes, the sentinels), for messages: never its
    password."""
    if url.startswith(CLUSTER_SCHEMES):
        return parse_cluster_url(url).describe()
    if url.startswith(SENTINEL_SCHEMES):
        return parse_sentinel_url(url).describe()
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or ''}"


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


class RedisState(StateBackend):
    shared: ClassVar[bool] = True

    def __init__(self, url: str, namespace: str = NAMESPACE) -> None:
        super().__init__(namespace)
        self.url = url
        self.where = describe(url)
        self._client: redis.Redis | RedisCluster | None = None
        self._cluster = url.startswith(CLUSTER_SCHEMES)
        # Behind Sentinel: the sentinels name the master, asked again for each new connection.
        self._sentinel: Sentinel | None = None
        self._sentinel_url: SentinelURL | None = None
        self._subscribers: list[redis.Redis] = []
        self._shas: dict[Script, str] = {}
        self._batch_scripts: dict[Script, Script] = {}
        self._subscriptions: list[RedisSubscription] = []
        self._queue: list[Call] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it was opened on
        # Standalone servers: batches go over one pipelined connection of our own (state/resp.py);
        # a cluster's go through redis-py, which routes each command to its slot's node.
        self._connection: PipelinedConnection | None = None
        self._connecting: asyncio.Task[PipelinedConnection] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        # What the batching did, for tests and statistics: pipelines sent, commands in them.
        self._written = WriteCounts()

    @property
    def pipelines_sent(self) -> int:
        return self._written.pipelines

    @property
    def commands_sent(self) -> int:
        return self._written.commands

    @property
    def client(self) -> redis.Redis | RedisCluster:
        if self._client is None:
            raise RuntimeError("the Redis state backend is not open")
        return self._client

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        # No retry once a command is sent: a script must not run twice. A pooled connection
        # that died while idle is replaced when taken from the pool, before anything is sent.
        options: dict[str, Any] = {
            "socket_timeout": OPERATION_TIMEOUT,
            "socket_connect_timeout": OPERATION_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
        }
        if self._cluster:
            cluster = parse_cluster_url(self.url)
            logins: dict[str, Any] = {
                "username": cluster.username,
                "password": cluster.password,
                "ssl": cluster.tls,
            }
            nodes = [ClusterNode(host, port) for host, port in cluster.nodes]
            self._client = RedisCluster(startup_nodes=nodes, **logins, **options)
            self._subscribers = [redis.Redis(host=h, port=p, **logins, **options) for h, p in cluster.nodes]
        elif self.url.startswith(SENTINEL_SCHEMES):
            watched = self._sentinel_url = parse_sentinel_url(self.url)
            self._sentinel = Sentinel(list(watched.nodes), **options)
            logins = {"username": watched.username, "password": watched.password, "ssl": watched.tls}
            self._client = self._sentinel.master_for(watched.service, db=watched.db, **logins, **options)
            self._subscribers = [
                self._sentinel.master_for(watched.service, db=watched.db, **logins, **options)
            ]
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

    async def ping(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        await self._flush_users()
        for subscription in self._subscriptions:
            await subscription.close()
        self._subscriptions.clear()
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()  # a connection it would open now would stay open
        if self._connection is not None:
            self._connection.close(RuntimeError(CLOSED))
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
        full_keys = self.keys_of_one_call(keys)
        return await self._call(("EVALSHA", self._sha(script), len(full_keys), *full_keys, *args), script)

    def decide(
        self,
        script: Script,
        tag: str,
        names: Sequence[str],
        args: Sequence[Any],
        settle: Callable[[Any], T],
    ) -> asyncio.Future[T]:
        loop = self._loop
        if self._client is None or loop is None:
            raise RuntimeError("the Redis state backend is not open")
        future = loop.create_future()
        # Batched on one server; a cluster's keys are in many slots: there each call goes alone.
        call = Call.decision(
            script,
            self._sha(script),
            self.tagged_keys(tag, names),
            args,
            future,
            settle,
            self.where,
            not self._cluster,
        )
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append(call)
        return future

    def _sha(self, script: Script) -> str:
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = hashlib.sha1(script.lua.encode()).hexdigest()
        return sha

    async def publish(self, channel: str, message: bytes) -> None:
        await self._call(("PUBLISH", self.key(channel), message))

    async def subscribe(self, channel: str, callback: Callable[[Message], None]) -> Subscription:
        if not self._subscribers:
            raise RuntimeError("the Redis state backend is not open")
        subscription = RedisSubscription(self._subscribers, self.key(channel), callback, self.where)
        self._subscriptions.append(subscription)
        return subscription

    # -- auto-pipelining ---------------------------------------------------------------------------
    def _call(
        self,
        command: tuple[Any, ...],
        script: Script | None = None,
        settle: Callable[[Any], Any] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue ``command`` for this turn's pipeline; the future is its reply (or StateUnavailable),
        or what ``settle`` makes of either."""
        loop = self._loop
        if self._client is None or loop is None:
            raise RuntimeError("the Redis state backend is not open")
        if not self._queue:
            loop.call_soon(self._flush)  # runs once every call of this turn has been queued
        future = loop.create_future()
        self._queue.append(Call(command, script, future, settle, self.where))
        return future

    def _flush(self) -> None:
        calls, self._queue = self._queue, []
        connection = self._connection
        if connection is not None and not connection.closed:
            # The common case: written at once, answered from the connection's data_received.
            pending = batched(calls, self._batch_form) if len(calls) > 1 else calls
            for start in range(0, len(pending), MAX_PIPELINE_COMMANDS):
                part = pending[start : start + MAX_PIPELINE_COMMANDS]
                try:
                    connection.send(part)
                except Exception as exc:  # lost meanwhile, or a command that cannot be packed
                    for call in part:
                        call.answer(exc)
            return
        loop = self._loop
        assert loop is not None
        sender = self._send_through_cluster if self._cluster else self._connect_and_send
        for start in range(0, len(calls), MAX_PIPELINE_COMMANDS):
            task = loop.create_task(sender(calls[start : start + MAX_PIPELINE_COMMANDS]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    def _batch_form(self, script: Script) -> tuple[Script, str]:
        batch_script = self._batch_scripts.get(script)
        if batch_script is None:
            assert script.batch_lua is not None  # only such calls are batched
            batch_script = self._batch_scripts[script] = Script(script.batch_lua, script.python)
        return batch_script, self._sha(batch_script)

    async def _connect_and_send(self, calls: list[Call]) -> None:
        """Open the pipelined connection (once however many batches wait for it), then send."""
        try:
            if self._connecting is None or self._connecting.done():
                assert self._loop is not None
                self._connecting = self._loop.create_task(self._open_connection())
            connection = await asyncio.shield(self._connecting)
            self._connection = connection
            connection.send(calls)
        except _UNANSWERED as exc:
            self._fail(calls, exc)
        except asyncio.CancelledError:
            self._fail(calls, RuntimeError(CLOSED))
            raise
        except Exception as exc:  # a bug, or a command that cannot be packed: no caller waits forever
            log.exception("connecting to Redis at %s failed", self.where)
            self._fail(calls, exc)

    async def _open_connection(self) -> PipelinedConnection:
        url = self.url
        if self._sentinel is not None and self._sentinel_url is not None:
            async with asyncio.timeout(OPERATION_TIMEOUT):
                host, port = await self._sentinel.discover_master(self._sentinel_url.service)
            url = self._sentinel_url.server_url(host, port)
        return await PipelinedConnection.open(url, OPERATION_TIMEOUT, self._written)

    async def _send_through_cluster(self, calls: list[Call]) -> None:
        """One pipeline through redis-py, which sends each command to its slot's node."""
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT):
                replies = await self._pipeline([call.command for call in calls])
                unknown = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
                resends = [calls[index].after_noscript() for index in unknown]
                if unknown and all(resends):
                    resent = await self._pipeline([call.command for call in resends if call is not None])
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
            call.answer(reply)

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one cluster pipeline; each reply, or the error it got, in order."""
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        self._written.pipelines += 1
        self._written.commands += len(commands)
        return await pipe.execute(raise_on_error=False)

    def _fail(self, calls: list[Call], cause: BaseException) -> None:
        error = cause if isinstance(cause, Exception) else RuntimeError(CLOSED)
        for call in calls:
            call.answer(error)
