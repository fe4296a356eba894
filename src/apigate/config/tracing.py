"""The ``tracing:`` section: W3C trace context is always propagated; this sets how many new
traces are marked sampled and where their spans are exported."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from apigate.config.headernames import HEADER_NAME
from apigate.config.units import Duration
from apigate.config.validators import Strict, check_http_url


class BatchConfig(Strict):
    """Batching as the OpenTelemetry SDK's batch span processor does it: spans wait in a bounded
    queue and go in batches (observe/otlp.py)."""

    max_queue_size: int = Field(
        default=2048, ge=1, le=1_000_000, description="spans waiting to be sent; more are dropped and counted"
    )
    max_export_batch_size: int = Field(default=512, ge=1, le=100_000, description="spans per request")
    schedule_delay: Duration = Field(default=5.0, gt=0, le=300, description="longest wait before a send")

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> BatchConfig:
        if self.max_export_batch_size > self.max_queue_size:
            raise ValueError("max_export_batch_size must not exceed max_queue_size")
        return self


HeaderValue = Annotated[str, Field(max_length=8192)]


class ExportConfig(Strict):
    """OTLP/HTTP (protobuf) export of sampled spans."""

    endpoint: str = Field(description="the collector's traces URL, e.g. http://collector:4318/v1/traces")
    headers: dict[str, HeaderValue] = Field(
        default_factory=dict, max_length=64, description="sent with every export (an API key, say)"
    )
    timeout: Duration = Field(default=10.0, gt=0, le=300, description="longest one export request takes")
    service_name: str = Field(default="apigate", min_length=1, max_length=255)
    batch: BatchConfig = BatchConfig()

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, url: str) -> str:
        return check_http_url(url)

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in value):
                raise ValueError(f"the value of {name!r} holds a control character")
        return {name.lower(): value for name, value in headers.items()}


class TracingConfig(Strict):
    sample_ratio: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="share of new traces marked sampled; a client's traceparent keeps its own flag",
    )
    export: ExportConfig | None = Field(
        default=None, description="send sampled spans to an OpenTelemetry collector (off when absent)"
    )
