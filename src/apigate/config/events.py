"""The ``events:`` section: request events streamed live (the admin listener's /api/events) and,
optionally, published to a Redis stream for other services."""

from __future__ import annotations

from pydantic import Field, field_validator

from apigate.config.validators import Strict, check_redis_url


class EventsRedisConfig(Strict):
    url: str = Field(description="redis://host:6379/0")
    stream: str = Field(default="apigate:events", min_length=1, max_length=200)
    max_length: int = Field(default=10_000, ge=1, le=100_000_000, description="XADD MAXLEN ~ (kept entries)")

    _redis_url = field_validator("url")(classmethod(lambda cls, v: check_redis_url(v)))


class EventsConfig(Strict):
    enabled: bool = Field(default=True, description="request events while someone listens (or redis is set)")
    sample: float = Field(default=1.0, ge=0.0, le=1.0, description="share of requests that make an event")
    max_per_second: int = Field(
        default=200,
        ge=1,
        le=100_000,
        description="events each worker sends at most per second (the rest are counted)",
    )
    redis: EventsRedisConfig | None = Field(default=None, description="also XADD every event to this stream")
