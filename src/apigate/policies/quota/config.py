"""The `quota` policy's config: limits per calendar period in a time zone, plans, cost."""

from __future__ import annotations

import re
from typing import Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from apigate.policies.base import PolicyConfig
from apigate.policies.limits.calendar import PERIODS
from apigate.policies.limits.config import KeyedLimitsConfig, TiersConfig, refuse_hybrid

Period = Literal["hour", "day", "week", "month"]
MAX_QUOTA: Final = 10**12
_QUOTA: Final = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*$", re.IGNORECASE)
QUOTA_FORMS: Final = "1000/day (or N/hour, N/week, N/month)"


def parse_quota(value: str) -> tuple[int, str]:
    """``"1000/day"`` → (1000, "day"); ValueError naming the accepted forms."""
    match = _QUOTA.match(value) if isinstance(value, str) else None
    if match is None or match.group(2).lower() not in PERIODS:
        raise ValueError(f"expected a quota such as {QUOTA_FORMS}, got {value!r}")
    count = int(match.group(1))
    if not 1 <= count <= MAX_QUOTA:
        raise ValueError(f"a quota allows 1 to {MAX_QUOTA} units a period, got {count}")
    return count, match.group(2).lower()


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ValueError if there is none of that name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}; give an IANA name such as Europe/Warsaw, America/New_York or UTC"
        ) from None


class QuotaLimitConfig(PolicyConfig):
    """One quota: ``quota: 1000/day``, or ``limit`` per ``period``."""

    name: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="names the quota in headers and keys"
    )
    quota: str | None = Field(default=None, description=QUOTA_FORMS)
    limit: int | None = Field(default=None, ge=1, le=MAX_QUOTA)
    period: Period | None = Field(
        default=None, description="a calendar hour, day, week (from Monday) or month"
    )

    @field_validator("quota")
    @classmethod
    def _check_quota(cls, quota: str | None) -> str | None:
        if quota is not None:
            parse_quota(quota)
        return quota

    @model_validator(mode="after")
    def _check_shape(self) -> QuotaLimitConfig:
        if (self.quota is None) == (self.limit is None):
            raise ValueError("give either `quota` (such as 1000/day) or `limit` with `period`")
        if self.limit is not None and self.period is None:
            raise ValueError("`limit` needs a `period` (hour, day, week or month)")
        if self.quota is not None and self.period is not None:
            raise ValueError("`period` goes with `limit`, not with `quota`")
        return self

    def amount(self) -> tuple[int, str]:
        """(units, period)."""
        if self.quota is not None:
            return parse_quota(self.quota)
        assert self.limit is not None and self.period is not None
        return self.limit, self.period

    def label(self) -> str:
        """The quota's name: given, or ``1000-per-day``."""
        limit, period = self.amount()
        return self.name or f"{limit}-per-{period}"


class QuotaTiersConfig(TiersConfig):
    plans: dict[str, list[QuotaLimitConfig]] = Field(min_length=1)  # type: ignore[assignment]


def _check_names(limits: list[QuotaLimitConfig]) -> None:
    names = [limit.label() for limit in limits]
    if len(set(names)) != len(names):
        raise ValueError("two quotas have the same name; give each a `name`")


class QuotaConfig(KeyedLimitsConfig):
    timezone: str = Field(default="UTC", description="the IANA time zone whose calendar periods follow")
    limits: list[QuotaLimitConfig] = Field(default_factory=list)
    tiers: QuotaTiersConfig | None = None
    cost: int = Field(default=1, ge=1, le=10**6, description="units each request takes")

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, name: str) -> str:
        zone(name)
        return name

    @field_validator("state_url")
    @classmethod
    def _check_own_state(cls, url: str | None) -> str | None:
        if url is not None:
            raise ValueError("quotas count on state.url (or in memory, written behind to the store)")
        return url

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, backend: str) -> str:
        return refuse_hybrid(
            backend, "a quota counts exactly on Redis, or in memory written behind to the store"
        )

    @field_validator("limits")
    @classmethod
    def _check_limits(cls, limits: list[QuotaLimitConfig]) -> list[QuotaLimitConfig]:
        _check_names(limits)
        return limits

    @model_validator(mode="after")
    def _check_some(self) -> QuotaConfig:
        if not self.limits and self.tiers is None:
            raise ValueError("give `limits` (such as [{quota: 1000/day}]) or `tiers`")
        for name, limits in self.tiers.plans.items() if self.tiers else []:
            try:
                _check_names(limits)
            except ValueError as exc:
                raise ValueError(f"tiers.plans.{name}: {exc}") from None
        return self
