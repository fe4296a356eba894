"""The ``usage:`` section: usage analytics (requests, errors, bytes and latency per consumer, API
key, tenant and route), counted per minute by every worker, written to the store in batches and
rolled up into hours and days by the node."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator

from apigate.config.units import Duration
from apigate.config.validators import Strict

HOUR_SECONDS = 3600.0
DAY_SECONDS = 86400.0


class UsageRollupConfig(Strict):
    hourly_after: Duration = Field(
        default=2 * DAY_SECONDS, ge=HOUR_SECONDS, description="minute rows older than this become hour rows"
    )
    daily_after: Duration = Field(
        default=30 * DAY_SECONDS, ge=DAY_SECONDS, description="hour rows older than this become day rows"
    )
    interval: Duration = Field(
        default=600.0, ge=1.0, le=DAY_SECONDS, description="how often the node rolls up and deletes old rows"
    )

    @field_validator("daily_after")
    @classmethod
    def _after_hourly(cls, value: float, info: ValidationInfo) -> float:
        hourly = info.data.get("hourly_after")
        if hourly is not None and value <= hourly:
            raise ValueError("must be longer than rollup.hourly_after")
        return value


class UsageConfig(Strict):
    enabled: bool = Field(default=False, description="count usage and write it to the store")
    flush_interval: Duration = Field(
        default=10.0, ge=0.05, le=HOUR_SECONDS, description="how often each worker writes what it counted"
    )
    max_pending_keys: int = Field(
        default=100_000,
        ge=1,
        le=10_000_000,
        description="most buckets a worker holds unwritten (the store away); more are dropped and counted",
    )
    rollup: UsageRollupConfig = UsageRollupConfig()
    retention: Duration = Field(
        default=400 * DAY_SECONDS, ge=DAY_SECONDS, description="day rows older than this are deleted"
    )

    @field_validator("retention")
    @classmethod
    def _after_daily(cls, value: float, info: ValidationInfo) -> float:
        rollup = info.data.get("rollup")
        if rollup is not None and value <= rollup.daily_after:
            raise ValueError("must be longer than rollup.daily_after")
        return value
