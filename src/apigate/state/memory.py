"""The memory state backend: one process's dict with expiry, and in-process pub/sub.

The default: nothing to install, nothing shared. Time comes from an injectable monotonic
clock, so expiry is testable without sleeping. Expired keys are dropped when read and in a
sweep every ``SWEEP_EVERY`` new keys (or half the size); past ``max_keys`` the oldest writes are
dropped, so a flood cannot grow memory without bound (Redis's maxmemory eviction does that there).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from apigate.state.base import NAMESPACE, LocalData, Message, Script, StateBackend, Subscription, T

SWEEP_EVERY = 1024
DEFAULT_MAX_KEYS = 1_000_000


class MemorySubscription(Subscription):
    def __init__(self, subscribers: list[Callable[[Message], None]], callback: Callable[[Message], None]):
        self._subscribers = subscribers
        self._callback = callback

    @property
    def active(self) -> bool:
        return False  # no other process can publish here

    async def close(self) -> None:
        if self._callback in self._subscribers:
            self._subscribers.remove(self._callback)


class MemoryState(StateBackend, LocalData):
    shared: ClassVar[bool] = False

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        namespace: str = NAMESPACE,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        super().__init__(namespace)
        self.clock = clock
        self.max_keys = max_keys
        self._values: dict[str, Any] = {}
        self._deadlines: dict[str, float] = {}  # only keys that expire
        self._writes = 0
        self._channels: dict[str, list[Callable[[Message], None]]] = {}

    def __len__(self) -> int:
        return len(self._values)

    # -- LocalData: what scripts (and the operations below) work on ----------------------------------
    def get(self, key: str) -> Any:
        deadline = self._deadlines.get(key)
        if deadline is not None and deadline <= self.clock():
            self.delete(key)
            return None
        return self._values.get(key)

    def set(self, key: str, value: Any) -> None:
        values = self._values
        if key not in values:
            self._writes += 1
            # Sweeps cost O(keys): spacing them by half the size keeps each write O(1) on average.
            if self._writes >= max(SWEEP_EVERY, len(values) // 2) or len(values) >= self.max_keys:
                self._sweep()
        values[key] = value

    def expire(self, key: str, ttl: float) -> None:
        if key in self._values:
            self._deadlines[key] = self.clock() + ttl

    def ttl(self, key: str) -> float | None:
        deadline = self._deadlines.get(key)
        if deadline is None:
            return None
        left = deadline - self.clock()
        if left <= 0:
            self.delete(key)
            return None
        return left

    def delete(self, key: str) -> None:
        self._values.pop(key, None)
        self._deadlines.pop(key, None)

    def _sweep(self) -> None:
        self._writes = 0
        now = self.clock()
        for key in [k for k, deadline in self._deadlines.items() if deadline <= now]:
            self.delete(key)
        # When full, make room for a run of writes, not one: the next sweep is then far away.
        excess = len(self._values) - self.max_keys + max(1, self.max_keys // 100)
        if len(self._values) >= self.max_keys and excess > 0:
            # Dicts keep insertion order: the first keys are the oldest writes.
            for key in list(itertools.islice(self._values, excess)):
                self.delete(key)

    # -- StateBackend ------------------------------------------------------------------------------
    def add_if_absent_nowait(self, key: str, ttl: float) -> bool:
        full = self.namespace + key
        if self.get(full) is not None:
            return False
        self.set(full, 1)
        self.expire(full, ttl)
        return True

    async def add_if_absent(self, key: str, ttl: float) -> bool:
        return self.add_if_absent_nowait(key, ttl)

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any] = ()) -> Any:
        return script.python(self, self.keys_of_one_call(keys), [str(a) for a in args])

    def decide(
        self,
        script: Script,
        tag: str,
        names: Sequence[str],
        args: Sequence[Any],
        settle: Callable[[Any], T],
    ) -> asyncio.Future[T]:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        texts = [a.decode() if isinstance(a, bytes) else str(a) for a in args]  # as Redis gets them
        reply = script.python(self, self.tagged_keys(tag, names), texts)
        future.set_result(settle(reply))
        return future

    async def publish(self, channel: str, message: bytes) -> None:
        loop = asyncio.get_running_loop()
        for callback in list(self._channels.get(channel, ())):
            loop.call_soon(callback, message)  # delivered later, as from a server

    async def subscribe(self, channel: str, callback: Callable[[Message], None]) -> Subscription:
        subscribers = self._channels.setdefault(channel, [])
        subscribers.append(callback)
        asyncio.get_running_loop().call_soon(callback, None)
        return MemorySubscription(subscribers, callback)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        await self._flush_users()
        self._values.clear()
        self._deadlines.clear()
        self._channels.clear()
