"""This process's quota counters, and how memory-backed quotas are written behind to the store.

Memory-backed quotas (``state: memory://``, or ``backend: memory``) count in this process, from
memory, as the other limits do. What they count must also survive a restart and reach the other
processes that share the store (``--workers N``, other nodes on one PostgreSQL). So every
``WRITE_INTERVAL`` the ledger writes what each changed counter gained since its last write, as an
addition to that counter's row (``QuotaStore.sync_quota_usage``), and reads back every row that
changed since its last read: its own, other processes' additions and resets made by `apigate
limits reset`. A key's count is then the store's plus what this process admitted since. Before the
gateway serves, it reads every live row; on a graceful stop it writes what is left.

Additions, not each process's own totals: any number of processes (workers, restarts, nodes) add to
one row, a restarted process starts from it, and a reset is one write that every process reads.
What a crash (SIGKILL, power loss) loses is what this process admitted since its last write, at
most about ``WRITE_INTERVAL`` of traffic (and a write under way). Processes see each other's
admissions within about that time, so together they may admit up to that much past a quota.

Counters are kept across config reloads, found by route and quota name, so a reload (even one
that changes the quota's number) keeps counting; Redis-backed quotas never reach the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from apigate.policies.limits import clock
from apigate.policies.limits.algorithms import KeyState
from apigate.policies.limits.calendar import CalendarQuota, QuotaCounters
from apigate.store.roles.quotas import QuotaStore, QuotaUsage

log = logging.getLogger("apigate.limits")

WRITE_INTERVAL: Final = 1.0  # seconds between writes: the most a crash loses
GRACE_MS: Final = 60_000  # counters outlive their period by this much (clocks of nodes differ a little)


@dataclass
class _Tracked:
    counters: QuotaCounters
    memory_backed: bool


class QuotaLedger:
    """The quota counters of this process and their write-behind; one per process (``LEDGER``)."""

    def __init__(self) -> None:
        self._tracked: dict[tuple[str, str], _Tracked] = {}
        self._open: Callable[[], Awaitable[QuotaStore]] | None = None
        self._store: QuotaStore | None = None
        self._version = 0  # of the store's usage, as far as this process has read it
        self._state_shared = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._failing = False

    def track(
        self, route: str, quota: str, algorithm: CalendarQuota, max_keys: int, memory_backed: bool
    ) -> QuotaCounters:
        """The counters of ``quota`` on ``route`` ("" for every route), kept across reloads."""
        known = self._tracked.get((route, quota))
        if known is not None and _same(known.counters.algorithm, algorithm):
            counters = known.counters
            counters.max_keys = max_keys
        else:
            counters = QuotaCounters(algorithm, max_keys)
            if known is not None:  # changed numbers: the same counts, under the new quota
                counters.entries = known.counters.entries
                counters.changed = known.counters.changed
            else:
                self._version = 0  # a new quota: read every row again, its own among them
        self._tracked[route, quota] = _Tracked(counters, memory_backed)
        return counters

    async def start(self, open_store: Callable[[], Awaitable[QuotaStore]], state_shared: bool) -> None:
        """Load the counts of memory-backed quotas from the store and write behind from now on
        (again after a reload: quotas it added are loaded now). Nothing while every quota counts on
        a shared state (Redis)."""
        self._open = open_store
        self._state_shared = state_shared
        if not any(t.memory_backed or not state_shared for t in self._tracked.values()):
            return
        if self._task is None:
            self._stopping = asyncio.Event()
            await self._sync_logged()  # before serving: counts as the store holds them
            self._task = asyncio.get_running_loop().create_task(self._write_behind())
        elif self._version == 0:
            await self._sync_logged()

    async def stop(self) -> None:
        """Write what is left (a graceful stop loses nothing) and stop writing."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping.set()
            await task
        self._store = None  # its owner closes it next; a later start opens the one it is given

    async def _write_behind(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), WRITE_INTERVAL)
            await self._sync_logged()

    async def _sync_logged(self) -> None:
        try:
            await self.sync()
        except Exception as exc:
            if not self._failing:
                self._failing = True
                log.error(
                    "quota: the store cannot keep the quota counters (%s); counting in memory, "
                    "retrying every second",
                    exc,
                )
            return
        if self._failing:
            self._failing = False
            log.warning("quota: the store keeps the quota counters again")

    async def sync(self) -> None:
        """Write what the counters gained since the last write; read what changed in the store."""
        if self._store is None:
            if self._open is None:
                return
            self._store = await self._open()
        sent: list[tuple[QuotaCounters, str, KeyState, int]] = []
        added: list[QuotaUsage] = []
        for (route, quota), tracked in list(self._tracked.items()):
            counters = tracked.counters
            if not counters.changed:
                continue
            keys = list(counters.changed)
            counters.changed.clear()
            algorithm = counters.algorithm
            assert isinstance(algorithm, CalendarQuota)
            for key in keys:
                state = counters.entries.get(key)
                gained = int(state.b - state.c) if state is not None else 0
                if state is None or gained <= 0:
                    continue
                state.c = state.b
                sent.append((counters, key, state, gained))
                period = algorithm.ident_of(state.a)
                added.append(QuotaUsage(route, quota, key, period, gained, (state.expires + GRACE_MS) / 1000))
        now_ms = clock.source()() // 1_000_000
        try:
            self._version, changed = await self._store.sync_quota_usage(added, self._version, now_ms / 1000)
        except Exception:  # not written (or, the connection lost at commit, perhaps written: then it
            # counts twice, which refuses early rather than admits past the quota)
            for counters, key, state, gained in sent:
                state.c -= gained
                counters.changed.add(key)  # again next time
            raise
        now_ms = clock.source()() // 1_000_000
        for usage in changed:
            owner = self._tracked.get((usage.route, usage.quota))
            if owner is None:
                continue
            algorithm = owner.counters.algorithm
            assert isinstance(algorithm, CalendarQuota)
            algorithm.at(now_ms)
            if usage.period == algorithm.ident:  # rows of past periods count for nothing here
                owner.counters.settle(usage.key, usage.used, now_ms)


def _same(one: object, other: CalendarQuota) -> bool:
    return isinstance(one, CalendarQuota) and (one.limit, one.period, str(one.zone)) == (
        other.limit,
        other.period,
        str(other.zone),
    )


LEDGER: Final = QuotaLedger()
"""This process's quota counters (policies are rebuilt on every reload; their counters are not)."""
