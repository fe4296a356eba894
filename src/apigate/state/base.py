"""The state backend: hot, short-lived state behind one small async interface.

What must last lives in the store; what is hot and may be lost lives here: replay and dedupe
windows, counters, and the change notices that tell every gateway to reload now. Two
implementations share the interface: ``memory`` (the default, one process) and ``redis``
(every process and node that names the same Redis sees the same state).

Keys and channels are names without a namespace; the backend prefixes them (``apigate:``), so
one Redis can serve other applications too. TTLs are seconds (floats).

A decision that reads and writes several keys runs as a ``Script``: Lua on Redis (atomic, one
round trip) and the same logic in Python on the memory backend, so both give the same answers.
On Redis Cluster a script runs on the node that holds its keys, so every key of one call must
hash to one slot: name them with ``same_slot`` (a Redis hash tag). Every backend refuses a call
whose keys do not, so a script that would fail on a cluster fails in every test too.
"""

from __future__ import annotations

import abc
import asyncio
import binascii
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from apigate.state.calls import tagged

log = logging.getLogger("apigate.state")

NAMESPACE = "apigate:"
T = TypeVar("T")
CLUSTER_SLOTS = 16384

Message = bytes | None
"""What a subscriber receives: a published message, or None each time the subscription is lost
or (re)established (``Subscription.active`` tells which)."""


class LocalData(Protocol):
    """The memory backend's data as a Script's Python half sees it (keys are namespaced already)."""

    def get(self, key: str) -> Any: ...

    def set(self, key: str, value: Any) -> None:
        """Store ``value``; an existing expiry is kept (like Redis SET ... KEEPTTL)."""

    def expire(self, key: str, ttl: float) -> None: ...

    def ttl(self, key: str) -> float | None:
        """Seconds left, or None if the key is missing or never expires."""

    def delete(self, key: str) -> None: ...


@dataclass(frozen=True, eq=False)
class Script:
    """One decision made where the state lives.

    ``lua`` runs on Redis with ``KEYS`` and ``ARGV`` (numbers arrive as strings: use
    ``tonumber``; the Python half gets them as strings too); ``python(data, keys, args)`` does
    the same on the memory backend. Return integers or flat lists of integers: those come back
    alike from both backends (Redis turns Lua strings into bytes, Python keeps str).

    ``batch_lua``, when given, decides several calls of ``decide()`` at once: ``KEYS`` and ``ARGV``
    are theirs one after another (each call with the same number of each), and it answers the list
    of their answers, an error reply in place of a call that failed alone (``pcall``). On one
    server the cost of a script call is mostly the call (parsing, lookup, setting up Lua), so the
    decisions of a loop turn then cost Redis a fraction of a call each.
    """

    lua: str
    python: Callable[[LocalData, list[str], list[Any]], Any]
    batch_lua: str | None = None


class Subscription(abc.ABC):
    """A live subscription to one channel."""

    @property
    @abc.abstractmethod
    def active(self) -> bool:
        """True while messages published by other processes are being received."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class StateBackend(abc.ABC):
    shared: ClassVar[bool]
    """True when other processes (and nodes) see the same state and messages."""

    def __init__(self, namespace: str = NAMESPACE) -> None:
        self.namespace = namespace
        self._before_close: list[Callable[[], Awaitable[None]]] = []

    def key(self, name: str) -> str:
        return self.namespace + name

    def before_close(self, flush: Callable[[], Awaitable[None]]) -> None:
        """Await ``flush`` when the backend closes, while it still answers: a user that holds
        writes back (hybrid rate-limit counters) sends them then."""
        if flush not in self._before_close:
            self._before_close.append(flush)

    async def _flush_users(self) -> None:
        """What ``close()`` does first: the ``before_close`` callbacks, a failing one logged."""
        flushes, self._before_close = self._before_close, []
        for flush in flushes:
            try:
                await flush()
            except Exception:
                log.exception("a write held back for the state backend was lost when it closed")

    @abc.abstractmethod
    async def open(self) -> None:
        """Prepare for use. Never fails for an unreachable server: operations report that."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and end subscriptions, after awaiting ``_flush_users()``."""

    async def ping(self) -> None:
        """Raise unless the backend answers (for /health/detailed); memory always does."""
        return None

    @abc.abstractmethod
    async def add_if_absent(self, key: str, ttl: float) -> bool:
        """Set ``key`` for ``ttl`` seconds if it is not set; True if this call set it."""

    def add_if_absent_nowait(self, key: str, ttl: float) -> bool | None:
        """``add_if_absent`` answered without waiting, when the backend can (memory); else None."""
        return None

    def keys_of_one_call(self, names: Sequence[str]) -> list[str]:
        """``names`` namespaced, refused (ValueError) unless they hash to one cluster slot."""
        keys = [self.namespace + name for name in names]
        if len(keys) > 1 and len({key_slot(key) for key in keys}) > 1:
            raise ValueError(f"the keys of one script call must hash to one slot (use same_slot): {names}")
        return keys

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add ``amount`` to an integer (missing: 0) and return it; ``ttl`` is set while it has none."""
        args: list[Any] = [int(amount), milliseconds(ttl) if ttl is not None else ""]
        return int(await self.run(INCR, [key], args))

    @abc.abstractmethod
    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any] = ()) -> Any:
        """Run ``script`` on ``keys`` (names, namespaced here) with ``args``."""

    @abc.abstractmethod
    def decide(
        self,
        script: Script,
        tag: str,
        names: Sequence[str],
        args: Sequence[Any],
        settle: Callable[[Any], T],
    ) -> asyncio.Future[T]:
        """``run`` for the hot path: ``script`` on the keys ``same_slot(tag, *names)``, with no
        coroutine. The future's result is ``settle(reply)``, where ``reply`` is the script's answer
        or, when the backend could not answer, a ``StateUnavailable``, so the caller decides what
        an outage means in the same place as an answer. Keys built from one tag share a slot by
        construction, so they need no check."""

    def tagged_keys(self, tag: str, names: Sequence[str]) -> list[str]:
        """``same_slot(tag, *names)``, namespaced."""
        return tagged(self.namespace, tag, names)

    @abc.abstractmethod
    async def publish(self, channel: str, message: bytes) -> None: ...

    @abc.abstractmethod
    async def subscribe(self, channel: str, callback: Callable[[Message], None]) -> Subscription:
        """Call ``callback`` with every message on ``channel``, and with None each time the
        subscription starts, resumes or is lost: messages sent while it is down are lost, so a
        subscriber that must not miss one checks its source then (and, after a loss, until it
        is active again)."""


def key_slot(key: str) -> int:
    """The Redis Cluster slot of ``key``: CRC16 of its hash tag (the first non-empty ``{...}``)
    or, without one, of the whole key."""
    data = key.encode()
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % CLUSTER_SLOTS


def milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _incr_locally(data: LocalData, keys: list[str], args: list[Any]) -> int:
    key, amount, ttl_ms = keys[0], int(args[0]), args[1]
    current = data.get(key)
    value = (int(current) if current is not None else 0) + amount
    data.set(key, value)
    if ttl_ms != "" and data.ttl(key) is None:
        data.expire(key, int(ttl_ms) / 1000)
    return value


INCR = Script(
    lua="""
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if ARGV[2] ~= '' and redis.call('PTTL', KEYS[1]) == -1 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
""",
    python=_incr_locally,
)
