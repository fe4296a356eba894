"""The ``tracing:`` section: W3C trace context is always propagated; this sets how many new
traces are marked sampled (and, with the ``otel`` extra, exported)."""

from __future__ import annotations

from pydantic import Field

from apigate.config.validators import Strict


class TracingConfig(Strict):
    sample_ratio: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="share of new traces marked sampled; a client's traceparent keeps its own flag",
    )
