"""The ``metrics:`` section: what the gateway counts and how Prometheus names it."""

from __future__ import annotations

from pydantic import Field

from apigate.config.validators import Strict

# Prometheus metric names: [a-zA-Z_:][a-zA-Z0-9_:]* (the prefix is the start of one).
_NAMESPACE = r"^[a-zA-Z_][a-zA-Z0-9_]*$"


class MetricsConfig(Strict):
    enabled: bool = Field(default=True, description="count requests per route and upstream target")
    namespace: str = Field(
        default="apigate",
        pattern=_NAMESPACE,
        max_length=64,
        description="prefix of every Prometheus metric name (api_gateway: api_gateway_requests_total, ...)",
    )
    consumers: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description="count requests per consumer for this many consumers (0: not per consumer); "
        "later ones count together as _other",
    )
    top_clients: int = Field(default=10, ge=0, le=100, description="clients listed in the JSON view")
