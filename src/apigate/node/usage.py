"""The node's part of usage analytics: the periodic rollup (minute rows into hours, hours into days,
old days deleted) and the store the admin API reads usage from, opened on first use from the
config's ``store.url``.

The rollup runs here, once per node, rather than in every worker: one process per machine asks,
and the store makes it safe beside the others (every node of a cluster rolls up the shared
database): each rollup is one transaction that deletes the rows it adds up, so a row is moved by
exactly one rollup, and one written meanwhile is moved by the next.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from apigate.observe.usage_queries import rollup_cutoffs
from apigate.store.roles.usage import RollupResult

if TYPE_CHECKING:
    from apigate.config.models import GatewayConfig
    from apigate.store import Store

log = logging.getLogger("apigate")

# The first rollup after the node starts waits at most this long (not a whole interval).
FIRST_ROLLUP_AFTER: Final = 60.0


class NodeUsage:
    def __init__(self, config: GatewayConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._store: Store | None = None
        self._opening = asyncio.Lock()
        self._rollups: asyncio.Task[None] | None = None

    def apply(self, config: GatewayConfig) -> None:
        """Roll up while ``usage.enabled`` (the loop reads the interval and ages as they are now)."""
        self.config = config
        if config.usage.enabled and self._rollups is None:
            self._rollups = asyncio.get_running_loop().create_task(self._roll_up_every_interval())
        elif not config.usage.enabled and self._rollups is not None:
            self._rollups.cancel()
            self._rollups = None

    async def store(self) -> Store:
        """The store, opened on first use (a store.url that changes takes effect after a restart)."""
        async with self._opening:
            if self._store is None:
                from apigate.store import open_store

                store = open_store(self.config.store.url)
                await store.open()
                self._store = store
            return self._store

    async def roll_up(self) -> RollupResult:
        store = await self.store()
        return await store.rollup_usage(rollup_cutoffs(self.config.usage, self.clock()))

    async def _roll_up_every_interval(self) -> None:
        await asyncio.sleep(min(FIRST_ROLLUP_AFTER, self.config.usage.rollup.interval))
        while True:
            try:
                result = await self.roll_up()
            except Exception as exc:
                log.warning(
                    "usage: the rollup failed, tried again in %.0fs: %s",
                    self.config.usage.rollup.interval,
                    exc,
                )
            else:
                if result != RollupResult():
                    log.info(
                        "usage: rolled up %d minute row(s) and %d hour row(s), deleted %d day row(s)",
                        result.minutes_rolled,
                        result.hours_rolled,
                        result.days_deleted,
                    )
            await asyncio.sleep(self.config.usage.rollup.interval)

    async def stop(self) -> None:
        if self._rollups is not None:
            self._rollups.cancel()
            self._rollups = None
        store, self._store = self._store, None
        if store is not None:
            await store.close()
