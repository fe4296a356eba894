"""Routes compiled from ``webhooks.sources``: ``POST {path}/{source}`` answered by ``webhook-ingest``.

They come after the configured routes, so a route written in ``routes:`` for the same path wins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apigate.config.models import RouteConfig

if TYPE_CHECKING:
    from apigate.config.models import GatewayConfig


def source_routes(config: GatewayConfig) -> list[RouteConfig]:
    webhooks = config.webhooks
    return [
        RouteConfig(
            name=f"webhooks/{name}",
            path=f"{webhooks.path}/{name}",
            max_body_size=source.max_body_size,
            policies={"webhook-ingest": {"source": name}},
        )
        for name, source in webhooks.sources.items()
    ]
