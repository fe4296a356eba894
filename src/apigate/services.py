"""Long-lived services that policies share: the store, the consumer registry, the state backend,
the webhook runtime and the write-behind of quota counters.

They outlive config reloads (a reload recompiles policies, not connections to the store) and
start only when a compiled snapshot needs them, so a gateway without consumers never opens
a database. The registry answers lookups from memory; the store is never read per request.
The state backend (memory, or Redis for a cluster) holds hot state such as replay windows and
carries change notices to the registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apigate.config.models import GatewayConfig
    from apigate.consumers.registry import ConsumerRegistry
    from apigate.policies.quota.ledger import QuotaLedger
    from apigate.policies.services import ServiceName
    from apigate.state import StateBackend
    from apigate.store import Store
    from apigate.webhooks.runtime import WebhookRuntime
    from apigate.webhooks.tracing import DeliverySpans

log = logging.getLogger("apigate")


class Services:
    """The running services; policies see them as ``policies.services.PolicyServices``."""

    def __init__(self) -> None:
        self.store: Store | None = None
        self.consumers: ConsumerRegistry | None = None
        self.webhooks: WebhookRuntime | None = None
        self.quotas: QuotaLedger | None = None
        self.delivery_spans: DeliverySpans | None = None  # given to the webhook runtime, now or later
        self._store_url: str | None = None
        self.state: StateBackend | None = None
        self._state_url: str | None = None
        self._states_of_policies: dict[str, StateBackend] = {}  # by URL: Redis a policy names itself
        # Reloads close together start services one after the other: two would both open (and
        # one would leak) what neither found running.
        self._starting = asyncio.Lock()

    async def start(
        self, config: GatewayConfig, needs: frozenset[ServiceName], state_urls: frozenset[str] = frozenset()
    ) -> bool:
        """Start what ``needs`` names and is not running yet, and open the state backends of
        ``state_urls`` not open yet; apply the config to what runs. True if a state backend was
        opened (policies compiled before then could not see it)."""
        async with self._starting:
            return await self._start(config, needs, state_urls)

    async def _start(
        self, config: GatewayConfig, needs: frozenset[ServiceName], state_urls: frozenset[str]
    ) -> bool:
        opened = bool(state_urls - self._states_of_policies.keys())
        for url in sorted(state_urls - self._states_of_policies.keys()):
            from apigate.state import open_state

            state = open_state(url)
            await state.open()  # as state.url's: never fails for an unreachable Redis
            self._states_of_policies[url] = state
        # The registry listens for change notices, so consumers need the state backend too.
        if ("state" in needs or "consumers" in needs) and self.state is None:
            from apigate.state import open_state

            state = open_state(config.state.url)
            await state.open()  # never fails for an unreachable Redis: operations report that
            self.state = state
            self._state_url = config.state.url
            opened = True
        elif self.state is not None and config.state.url != self._state_url:
            log.warning("state.url changes take effect after a restart, not a reload")
        if "consumers" in needs and self.consumers is None:
            from apigate.consumers.registry import ConsumerRegistry

            store = await self.store_for(config)
            registry = ConsumerRegistry(store, config, self.state)
            await registry.start()
            self.consumers = registry
            log.info("consumer registry loaded from the store (%d consumers)", registry.consumer_count())
        elif self.consumers is not None:
            if config.store.url != self._store_url:
                log.warning("store.url changes take effect after a restart, not a reload")
            self.consumers.apply_config(config)
        await self._start_webhooks(config, needs)
        await self._start_quotas(config, needs)
        return opened

    def gauges(self) -> dict[str, int]:
        """What the services hold now, for the node's merged metrics: the keys the limits count
        in this process (rate-limit, spike-arrest and quota counters in memory, expired ones not
        yet swept included; those in Redis are Redis's)."""
        from apigate.policies.cache.store import all_stores
        from apigate.policies.limits.local import all_counters

        return {
            "rate_limit_keys": sum(len(counters.entries) for counters in all_counters().values()),
            "cache_size": sum(len(store) for store in all_stores()),  # hot copies of Redis included
        }

    def counters(self) -> dict[str, int]:
        """What the services counted since the process started: requests answered from the cache,
        and (store: redis) those that bypassed it while Redis could not be used."""
        from apigate.policies.cache.redis_store import current_layer
        from apigate.policies.cache.store import all_stores

        counts = {"requests_cached": sum(store.hits for store in all_stores())}
        layer = current_layer()
        if layer is not None:
            counts["cache_bypassed"] = layer.bypassed
            counts["cache_redis_errors"] = layer.errors
        return counts

    def transform_bodies(self) -> list[list[object]]:
        """What the transform policy did with each body since the process started, as
        [route, direction, outcome, n] rows (policies/transform/counts.py)."""
        from apigate.policies.transform.counts import rows

        return rows()

    def webhook_metrics(self) -> dict[str, object] | None:
        """Webhooks taken in and delivered by this process, and the store's backlog (None: no
        webhook source is configured)."""
        return self.webhooks.metrics() if self.webhooks is not None else None

    def state_at(self, url: str) -> StateBackend | None:
        return self._states_of_policies.get(url)

    async def store_for(self, config: GatewayConfig) -> Store:
        """The store, opened on first use and shared by every service that needs it."""
        if self.store is None:
            from apigate.store import open_store

            store = open_store(config.store.url)
            await store.open()
            self.store = store
            self._store_url = config.store.url
        return self.store

    # -- webhooks: intake and delivery, started when a source is configured -------------------------
    def trace_deliveries(self, spans: DeliverySpans) -> None:
        """Trace webhook delivery attempts with ``spans``, whether the runtime runs yet or not."""
        self.delivery_spans = spans
        if self.webhooks is not None:
            self.webhooks.trace_deliveries(spans)

    async def _start_webhooks(self, config: GatewayConfig, needs: frozenset[ServiceName]) -> None:
        if self.webhooks is not None:
            self.webhooks.apply_config(config.webhooks)
        elif "webhooks" in needs:
            from apigate.webhooks.runtime import WebhookRuntime

            runtime = WebhookRuntime(await self.store_for(config), config.webhooks)
            if self.delivery_spans is not None:
                runtime.trace_deliveries(self.delivery_spans)
            await runtime.start()
            self.webhooks = runtime

    # -- quotas: memory-backed counters written behind to the store ---------------------------------
    async def _start_quotas(self, config: GatewayConfig, needs: frozenset[ServiceName]) -> None:
        if "quotas" in needs:
            from apigate.policies.quota.ledger import LEDGER

            shared = self.state is not None and self.state.shared
            # Opens the store only if a quota counts in memory; loads its counts before serving.
            await LEDGER.start(lambda: self.store_for(config), shared)
            self.quotas = LEDGER

    async def reachability(self, timeout: float = 2.0) -> dict[str, dict[str, object]]:
        """Whether the running store and shared state backend answer, and how fast."""
        probes: dict[str, Callable[[], Awaitable[None]]] = {}
        if self.store is not None:
            probes["store"] = self.store.ping
        if self.state is not None and self.state.shared:
            probes["state"] = self.state.ping
        found: dict[str, dict[str, object]] = {}
        for name, ping in probes.items():
            started = time.monotonic()
            try:
                await asyncio.wait_for(ping(), timeout)
            except Exception as exc:
                found[name] = {"status": "unreachable", "error": f"{type(exc).__name__}: {exc}"[:200]}
            else:
                found[name] = {"status": "ok", "latency_ms": round((time.monotonic() - started) * 1000, 3)}
        return found

    async def stop(self) -> None:
        if self.webhooks is not None:  # first: it commits and records through the store
            await self.webhooks.stop()
            self.webhooks = None
        if self.quotas is not None:  # writes what the quotas counted since their last write
            await self.quotas.stop()
            self.quotas = None
        if self.consumers is not None:
            await self.consumers.stop()
            self.consumers = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self.state is not None:
            await self.state.close()
            self.state = None
        for state in self._states_of_policies.values():
            await state.close()
        self._states_of_policies.clear()
