"""Sending hybrid counters' deltas to Redis every ``sync_interval``, and bringing back the counts.

One task per process serves every hybrid limit (its counters outlive reloads, ``limits/local.py``).
When a limit's interval has passed, each of its queued keys becomes one ``SYNC`` script call:
add this process's unsent cost to the key's window count, answer the counts of that window and
the one before. All the calls of one round are made in one loop turn, so the state backend sends
them in one pipelined round trip (per Redis Cluster node); the keys are those of ``backend: state``
(``same_slot`` hash tags, the same hash fields), so `apigate limits show|reset` read and reset
hybrid counters too.

Redis not answering: the deltas go back to their keys and are sent again at the next interval,
the process goes on deciding from its view, and the outage is logged once, when it starts, and
once when Redis answers again. Memory is bounded by the counters' ``max_keys``: deltas live in
the keys' states. When a state backend closes (shutdown), the last deltas are sent first.
A state backend that is not shared (``memory://``) has nobody to merge with: deltas are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from apigate.policies.limits.algorithms import KeyState
from apigate.policies.limits.hybrid import Delta, HybridCounters
from apigate.state import Script, StateBackend, same_slot
from apigate.state.base import LocalData

log = logging.getLogger("apigate.limits")

_SYNC_LUA: Final = """
local index, added, before = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local function int(x) return string.format('%d', x) end
local s = redis.call('HMGET', KEYS[1], 'i', 'c', 'p')
local i = tonumber(s[1])
local current, previous = tonumber(s[2]) or 0, tonumber(s[3]) or 0
if i ~= nil and i > index then
    if i == index + 1 and added > 0 then
        previous = previous + added
        redis.call('HSET', KEYS[1], 'p', int(previous))
    end
    return {i, current, previous}
end
if i == index - 1 then
    current, previous = 0, current
elseif i ~= index then
    current, previous = 0, 0
end
current, previous = current + added, previous + before
if added > 0 or before > 0 then
    redis.call('HSET', KEYS[1], 'i', int(index), 'c', int(current), 'p', int(previous))
    redis.call('PEXPIRE', KEYS[1], int(2 * window))
end
return {index, current, previous}
"""


def _sync_locally(data: LocalData, keys: list[str], args: list[Any]) -> list[int]:
    index, added, before, window = (int(a) for a in args)
    stored = data.get(keys[0])
    if stored is not None and stored.a > index:
        if stored.a == index + 1 and added > 0:
            data.set(keys[0], KeyState(0, stored.a, stored.b, stored.c + added))
            return [stored.a, stored.b, stored.c + added]
        return [stored.a, stored.b, stored.c]
    current, previous = 0, 0
    if stored is not None and stored.a == index:
        current, previous = stored.b, stored.c
    elif stored is not None and stored.a == index - 1:
        previous = stored.b
    current, previous = current + added, previous + before
    if added > 0 or before > 0:
        data.set(keys[0], KeyState(0, index, current, previous))
        data.expire(keys[0], 2 * window / 1000)
    return [index, current, previous]


SYNC: Final = Script(lua=_SYNC_LUA, python=_sync_locally)
"""``KEYS = [counter]``, ``ARGV = [index, added, before, window_ms]``: add ``added`` to window
``index`` and ``before`` to the window before it (a window later than the stored one replaces
it; a delta of the window before a stored later one is added to that one's previous count).
Answer ``[window, its count, the previous window's count]``: of ``index``, or of the later
window Redis already counts. Expiry: two windows after the last write."""


@dataclass(eq=False)
class Watched:
    """One hybrid limit: its counters and, from the policy that built them last, where they go."""

    counters: HybridCounters
    prefix: str  # of the counter keys: scope, policy:limit, each followed by a unit separator
    interval: float  # seconds
    state: Callable[[], StateBackend | None]
    policy: str
    due: float = 0.0  # loop time of its next sync


class Syncer:
    """The task that syncs every hybrid limit of this process."""

    def __init__(self) -> None:
        self.watched: dict[int, Watched] = {}  # by id of the counters (kept for the process's life)
        self.outage: weakref.WeakSet[StateBackend] = weakref.WeakSet()
        self._closing: weakref.WeakSet[StateBackend] = weakref.WeakSet()  # they flush us when closing
        self._unshared: weakref.WeakSet[StateBackend] = weakref.WeakSet()  # said to count alone
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self._wake: asyncio.Future[None] | None = None
        # What the syncing did, for tests and statistics: rounds sent, and those Redis did not answer.
        self.rounds = 0
        self.failed_rounds = 0

    def watch(
        self,
        counters: HybridCounters,
        prefix: str,
        interval: float,
        state: Callable[[], StateBackend | None],
        policy: str,
    ) -> None:
        """Sync ``counters`` every ``interval`` seconds (a reload's policy replaces the last one's)."""
        known = self.watched.get(id(counters))
        if known is not None and known.interval == interval:
            known.prefix, known.state, known.policy = prefix, state, policy
            return
        self.watched[id(counters)] = Watched(counters, prefix, interval, state, policy)
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            _wake_up(wake)  # a new interval: sync now, then keep to it

    def start(self) -> None:
        """Run on this loop (idempotent; a loop of an earlier run, in tests, is left behind). Without
        a running loop (a policy called outside a gateway), nothing is synced."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._loop is loop and self._task is not None and not self._task.done():
            return
        self._loop, self._lock, self._wake = loop, asyncio.Lock(), None
        self._closing.clear()
        self._task = loop.create_task(self._run(), name="limits-hybrid-sync")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            due = [watched for watched in self.watched.values() if watched.due <= now]
            for watched in due:
                watched.due = now + watched.interval
            if due:
                try:
                    await self.sync(due)
                except Exception:  # a bug must not end syncing for good
                    log.exception("syncing hybrid rate-limit counters failed")
            next_due = min((watched.due for watched in self.watched.values()), default=now + 1.0)
            self._wake = loop.create_future()
            timer = loop.call_later(max(next_due - loop.time(), 0.001), _wake_up, self._wake)
            await self._wake
            timer.cancel()

    async def sync(self, watched: list[Watched]) -> None:
        """One round: every queued key of ``watched`` in one pipelined round trip per backend."""
        assert self._lock is not None
        async with self._lock:
            await self._round(watched)

    async def flush(self) -> None:
        """Send every unsent delta now (a state backend is closing)."""
        if self._lock is not None:
            await self.sync(list(self.watched.values()))

    async def _round(self, watched: list[Watched]) -> None:
        sent: list[tuple[Watched, StateBackend, Delta]] = []
        calls = []
        for item in watched:
            state = item.state()
            if state is None:
                continue  # not running: the deltas wait
            if not state.shared:
                item.counters.collect()  # memory://: this process's count is all there is
                self._say_unshared(state, item.policy)
                continue
            if state not in self._closing:
                self._closing.add(state)
                state.before_close(self.flush)
            window = item.counters.algorithm.window_ms
            for delta in item.counters.collect():
                keys = same_slot(item.prefix + delta.key, "rl")
                calls.append(state.run(SYNC, keys, [delta.index, delta.added, delta.before, window]))
                sent.append((item, state, delta))
        if not calls:
            return
        self.rounds += 1
        replies = await asyncio.gather(*calls, return_exceptions=True)
        failed: dict[StateBackend, BaseException] = {}
        answered: set[StateBackend] = set()
        for (item, state, delta), reply in zip(sent, replies, strict=True):
            if isinstance(reply, BaseException):
                item.counters.restore(delta)
                failed.setdefault(state, reply)
            else:
                index, current, previous = (int(number) for number in reply)
                item.counters.apply(delta, index, current, previous)
                answered.add(state)
        self.failed_rounds += bool(failed)
        self._report(watched, failed, answered)

    def _say_unshared(self, state: StateBackend, policy: str) -> None:
        if state not in self._unshared:
            self._unshared.add(state)
            log.warning(
                "%s (backend: hybrid): the state backend is not shared (state.url: memory://); "
                "each process counts alone",
                policy,
            )

    def _report(
        self, watched: list[Watched], failed: dict[StateBackend, BaseException], answered: set[StateBackend]
    ) -> None:
        """The start and the end of an outage, once each."""
        for state, exc in failed.items():
            if state not in self.outage:
                self.outage.add(state)
                log.warning(
                    "%s (backend: hybrid): %s; each process decides from the counts it last heard "
                    "and its own, and sends its deltas again every sync_interval",
                    _names(watched, state),
                    exc,
                )
        for state in answered - failed.keys():
            if state in self.outage:
                self.outage.discard(state)
                log.warning(
                    "%s (backend: hybrid): Redis answers again; counts are shared", _names(watched, state)
                )


def _names(watched: list[Watched], state: StateBackend) -> str:
    return ", ".join(sorted({item.policy for item in watched if item.state() is state}))


def _wake_up(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


SYNCER: Final = Syncer()
"""The process's syncer (one event loop serves a gateway process)."""
