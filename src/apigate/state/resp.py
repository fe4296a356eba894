"""One pipelined connection to a Redis server, for the decisions made on every request.

Written here rather than taken from redis-py because it is on the hot path of Redis-backed
rate limits: redis-py's pipeline packs each command through Python generators, writes through
a stream writer and parses each reply through its own layers, which measured about a third of
the gateway's time under load. Here a batch is packed by hiredis (C), leaves in one write, and
replies are parsed by hiredis as they arrive and handed straight to their callers in order
(Redis answers a connection's commands in the order sent): no task, no gather, no future of
its own per command. Anything unusual closes the connection: every command still waiting fails,
and the next batch opens a new one, so a reply can never be matched to the wrong command.

Each batch has a deadline: when a batch is not wholly answered by then, Redis is taken to be
hung and the connection is closed (its late replies can reach nobody).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Sequence
from typing import Any, Protocol

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError


class Pending(Protocol):
    """A command waiting for its reply."""

    command: tuple[Any, ...]

    def answer(self, reply: Any) -> None:
        """Take the reply: a value, or an exception (an error reply, a lost connection, a timeout)."""

    def after_noscript(self) -> Pending | None:
        """The command to send instead when Redis does not know the script (EVAL with its text); None
        when there is none, and the NOSCRIPT error is the answer."""


class FutureReply:
    """A command whose reply (or error) resolves a future: for the few commands sent outside batches."""

    __slots__ = ("command", "future")

    def __init__(self, command: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
        self.command = command
        self.future = future

    def answer(self, reply: Any) -> None:
        if not self.future.done():
            self.future.set_result(reply)

    def after_noscript(self) -> Pending | None:
        return None


class WriteCounts:
    """What a backend's connections wrote: pipelines (one write each) and the commands in them."""

    __slots__ = ("commands", "pipelines")

    def __init__(self) -> None:
        self.pipelines = 0
        self.commands = 0


class PipelinedConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[Pending] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.loop = asyncio.get_running_loop()
        # Commands sent and answered so far, and each batch's (deadline, commands sent with it).
        self.sent = 0
        self.answered = 0
        self.deadlines: collections.deque[tuple[float, int]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.timeout = 1.0
        self.counts = WriteCounts()

    @classmethod
    async def open(cls, url: str, timeout: float, counts: WriteCounts) -> PipelinedConnection:
        """Connect to the server of ``url`` (redis://, rediss://, unix://), log in, select its db;
        what it writes is added to ``counts``."""
        loop = asyncio.get_running_loop()
        options = parse_url(url)
        async with asyncio.timeout(timeout):
            if "path" in options:
                _, connection = await loop.create_unix_connection(cls, options["path"])
            else:
                tls = ssl.create_default_context() if url.startswith("rediss://") else None
                host, port = options.get("host", "localhost"), options.get("port", 6379)
                _, connection = await loop.create_connection(cls, host, port, ssl=tls)
            connection.timeout = timeout
            greeting: list[tuple[Any, ...]] = []
            if options.get("password"):
                login = (
                    (options["username"], options["password"])
                    if options.get("username")
                    else (options["password"],)
                )
                greeting.append(("AUTH", *login))
            if options.get("db"):
                greeting.append(("SELECT", options["db"]))
            if greeting:
                replies = [FutureReply(command, loop.create_future()) for command in greeting]
                connection.send(replies)
                for reply in await asyncio.gather(*(pending.future for pending in replies)):
                    if isinstance(reply, Exception):
                        connection.close()
                        raise reply
        connection.counts = counts  # from here on: the greeting is not the caller's traffic
        return connection

    def send(self, calls: Sequence[Pending]) -> None:
        """Write the commands of ``calls`` at once; each gets its reply through ``answer`` (an error
        reply as a ResponseError, a lost connection as a ConnectionError, no answer within the
        timeout as a TimeoutError)."""
        if self.closed or self.transport is None:
            raise RedisConnectionError("the connection to Redis is closed")
        # Packed before anything is queued: a command that cannot be packed raises here and
        # leaves the connection as it was (a queued call with nothing sent would take the reply
        # of the call after it).
        data = b"".join([hiredis.pack_command(call.command) for call in calls])
        self.waiting.extend(calls)
        self.transport.write(data)
        self.sent += len(calls)
        self.counts.pipelines += 1
        self.counts.commands += len(calls)
        self.deadlines.append((self.loop.time() + self.timeout, self.sent))
        if self.timer is None:
            self.timer = self.loop.call_at(self.deadlines[0][0], self._check_deadlines)

    def close(self, error: Exception | None = None) -> None:
        """End the connection; every command still waiting fails (with ``error``, if given)."""
        if self.transport is not None:
            self.transport.close()
        self._lost(error or RedisConnectionError("the connection to Redis was closed"))

    def _check_deadlines(self) -> None:
        self.timer = None
        deadlines = self.deadlines
        while deadlines and deadlines[0][1] <= self.answered:
            deadlines.popleft()
        if not deadlines or self.closed:
            return
        deadline = deadlines[0][0]
        if deadline <= self.loop.time():
            self.close(TimeoutError(f"no answer within {self.timeout:g}s"))
        else:
            self.timer = self.loop.call_at(deadline, self._check_deadlines)

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        resend: list[Pending] = []
        try:
            self._take_replies(reader, waiting, resend)
        finally:
            if resend:  # calls Redis did not know the script of: sent again, or failed with the rest
                try:
                    self.send(resend)
                except Exception as exc:
                    for pending in resend:
                        pending.answer(exc)

    def _take_replies(self, reader: Any, waiting: collections.deque[Pending], resend: list[Pending]) -> None:
        try:
            reply = reader.gets()
            while reply is not False:
                if not waiting:  # a reply nobody asked for: the stream cannot be trusted
                    self.close()
                    return
                pending = waiting.popleft()
                self.answered += 1
                if isinstance(reply, hiredis.ReplyError):
                    error = _error(reply)
                    instead = pending.after_noscript() if isinstance(error, NoScriptError) else None
                    if instead is not None:
                        resend.append(instead)
                    else:
                        pending.answer(error)
                    if str(error).startswith("READONLY"):
                        # A replica now (a failover): the next batch finds the master again.
                        self.close()
                        return
                else:
                    pending.answer(reply)
                reply = reader.gets()
        except hiredis.ProtocolError as exc:
            if self.transport is not None:
                self.transport.close()
            self._lost(RedisConnectionError(f"Redis sent something that is not RESP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(RedisConnectionError(f"the connection to Redis was lost: {exc or 'closed by the server'}"))

    def _lost(self, error: Exception) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiting, self.waiting = self.waiting, collections.deque()
        for pending in waiting:
            pending.answer(error)


def _error(reply: hiredis.ReplyError) -> ResponseError:
    message = str(reply)
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)
