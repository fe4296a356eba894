"""Usage analytics in each worker: every finished exchange is added to a bucket of the current
minute in memory (a dict probe and a few additions on the event loop), and a background task
writes the buckets to the store in one batch every ``usage.flush_interval`` and once more when the
worker stops. A write that fails keeps its buckets for the next one; while the store stays away,
at most ``usage.max_pending_keys`` buckets wait, and requests that would need another are dropped
and counted (and logged). Rollups and the queries run elsewhere (node/usage.py, usage_queries.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from apigate.store.roles.usage import MINUTE, UsageBucket, UsageCounts

if TYPE_CHECKING:
    from apigate.config.models import GatewayConfig
    from apigate.engine.exchange import Exchange
    from apigate.observe.base import FinishHook
    from apigate.services import Services

log = logging.getLogger("apigate")

# Longest consumer or tenant kept (from a token's claims, they are whatever its issuer wrote).
MAX_IDENTITY: Final = 200
# The last write, when the worker stops, waits at most this long for the store.
FINAL_FLUSH_TIMEOUT: Final = 10.0

# (minute start, route, consumer, key id, tenant)
BucketKey = tuple[int, str | None, str | None, str | None, str | None]


class UsageObserver:
    """The ``Observer`` (observe/base.py) of usage analytics; ``clock`` gives unix seconds."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        # Per bucket: requests, client errors, server errors, bytes in, bytes out, latency sum and
        # maximum (ms): a list, so the hook adds in place.
        self.pending: dict[BucketKey, list[float]] = {}
        self.dropped = 0  # requests not counted because ``pending`` was full
        self._dropped_reported = 0
        self._config: GatewayConfig | None = None
        self._services: Services | None = None
        self._max_keys = 0
        self._interval = 10.0
        self._flushing = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def apply(self, config: GatewayConfig) -> FinishHook | None:
        self._config = config
        usage = config.usage
        self._max_keys = usage.max_pending_keys
        self._interval = usage.flush_interval
        return self.count if usage.enabled else None

    def count(self, exchange: Exchange) -> None:
        """The finish hook: add ``exchange`` to its bucket of the current minute."""
        now = int(self.clock())
        consumer = exchange.consumer
        if consumer is not None and not isinstance(consumer, str):
            consumer = getattr(consumer, "id", None)
        if consumer is not None and len(consumer) > MAX_IDENTITY:
            consumer = consumer[:MAX_IDENTITY]
        tenant = exchange.tenant
        if tenant is not None and len(tenant) > MAX_IDENTITY:
            tenant = tenant[:MAX_IDENTITY]
        state = exchange.state
        route = exchange.route
        key: BucketKey = (
            now - now % MINUTE,
            None if route is None else route.name,
            consumer,
            None if state is None else state.get("key_id"),
            tenant,
        )
        counts = self.pending.get(key)
        if counts is None:
            if len(self.pending) >= self._max_keys:
                self.dropped += 1
                return
            counts = self.pending[key] = [0, 0, 0, 0, 0, 0.0, 0.0]
        status = exchange.response_status
        latency = (exchange.t_end - exchange.t_start) * 1000.0
        counts[0] += 1
        if status >= 500:
            counts[2] += 1
        elif status >= 400:
            counts[1] += 1
        counts[3] += exchange.bytes_in
        counts[4] += exchange.bytes_out
        counts[5] += latency
        if latency > counts[6]:
            counts[6] = latency

    def counts(self) -> dict[str, int]:
        return {"usage_dropped": self.dropped}

    async def start(self, config: GatewayConfig, services: Services) -> None:
        self._config = config
        self._services = services
        self._task = asyncio.get_running_loop().create_task(self._flush_every_interval())

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task  # it writes once more before it ends
            self._task = None

    async def _flush_every_interval(self) -> None:
        while not self._stopping.is_set():
            # A stop wakes the wait at once; a write under way is never cancelled (its buckets
            # would be lost, or written and then kept to be written again).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)
            if self._stopping.is_set():
                try:
                    await asyncio.wait_for(self.flush(), FINAL_FLUSH_TIMEOUT)
                except TimeoutError:
                    log.error(
                        "usage: the store did not take the last counts within %.0fs", FINAL_FLUSH_TIMEOUT
                    )
                return
            await self.flush()

    async def flush(self) -> bool:
        """Write what is pending in one batch; False (and the buckets kept) if that failed."""
        async with self._flushing:
            if not self.pending:
                self._report_dropped()
                return True
            batch, self.pending = self.pending, {}
            try:
                if self._services is None or self._config is None:
                    raise RuntimeError("usage analytics has not started")
                store = await self._services.store_for(self._config)
                await store.add_usage([_bucket(key, counts) for key, counts in batch.items()])
            except Exception as exc:
                self._keep(batch)
                log.warning(
                    "usage: writing %d bucket(s) failed, kept for the next write: %s", len(batch), exc
                )
                return False
            self._report_dropped()
            return True

    def _keep(self, batch: dict[BucketKey, list[float]]) -> None:
        """Put back buckets a write did not take (counted meanwhile: added together)."""
        pending = self.pending
        for key, counts in batch.items():
            current = pending.get(key)
            if current is None:
                if len(pending) >= self._max_keys:
                    self.dropped += int(counts[0])
                    continue
                pending[key] = counts
                continue
            for index in range(6):
                current[index] += counts[index]
            current[6] = max(current[6], counts[6])

    def _report_dropped(self) -> None:
        if self.dropped > self._dropped_reported:
            log.warning(
                "usage: %d request(s) not counted since the last write (more than usage.max_pending_keys "
                "buckets waited for the store)",
                self.dropped - self._dropped_reported,
            )
            self._dropped_reported = self.dropped


def _bucket(key: BucketKey, counts: list[float]) -> UsageBucket:
    requests, client_errors, server_errors, bytes_in, bytes_out, latency_sum, latency_max = counts
    return UsageBucket(
        MINUTE,
        *key,
        UsageCounts(
            int(requests),
            int(client_errors),
            int(server_errors),
            int(bytes_in),
            int(bytes_out),
            latency_sum,
            latency_max,
        ),
    )
