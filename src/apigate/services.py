"""Long-lived services that policies share: the store and the in-process consumer registry.

They outlive config reloads (a reload recompiles policies, not connections to the store) and
start only when a compiled snapshot needs them, so a gateway without consumers never opens
a database. The registry answers lookups from memory; the store is never read per request.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apigate.config.models import GatewayConfig
    from apigate.consumers.registry import ConsumerRegistry
    from apigate.store import Store

log = logging.getLogger("apigate")


class Services:
    def __init__(self) -> None:
        self.store: Store | None = None
        self.consumers: ConsumerRegistry | None = None
        self._store_url: str | None = None

    async def start(self, config: GatewayConfig, needs: frozenset[str]) -> None:
        """Start what ``needs`` names and is not running yet; apply the config to what runs."""
        if "consumers" in needs and self.consumers is None:
            from apigate.consumers.registry import ConsumerRegistry
            from apigate.store import open_store

            store = open_store(config.store.url)
            await store.open()
            self.store = store
            self._store_url = config.store.url
            registry = ConsumerRegistry(store, config)
            await registry.start()
            self.consumers = registry
            log.info("consumer registry loaded from the store (%d consumers)", registry.consumer_count())
        elif self.consumers is not None:
            if config.store.url != self._store_url:
                log.warning("store.url changes take effect after a restart, not a reload")
            self.consumers.apply_config(config)

    async def stop(self) -> None:
        if self.consumers is not None:
            await self.consumers.stop()
            self.consumers = None
        if self.store is not None:
            await self.store.close()
            self.store = None
