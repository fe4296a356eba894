"""Config models shared by the limiting policies: rates, limits, keys, tiers, response headers."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Final, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from apigate.config.headernames import check_header_name
from apigate.config.units import Duration
from apigate.policies.base import PolicyConfig
from apigate.policies.limits.algorithms import MAX_PRODUCT
from apigate.state.urls import check_state_url

_RATE: Final = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$", re.IGNORECASE)
_UNIT_SECONDS: Final = {
    "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}  # fmt: skip
RATE_FORMS: Final = "100/min (also /s, /sec, /second, /m, /minute, /h, /hour, /d, /day, or /10s)"
# What backend: hybrid can merge: counts per window, which add up across processes.
HYBRID_ALGORITHMS: Final = ("fixed_window", "sliding_window")
_UNMERGEABLE: Final = {
    "token_bucket": "a token bucket's level refills over time",
    "leaky_bucket": "a leaky bucket's queue drains over time",
    "sliding_log": "a sliding log keeps the time of every request",
}
SYNC_INTERVAL_BOUNDS: Final = (0.01, 60.0)

Algorithm = Literal["sliding_window", "sliding_log", "fixed_window", "token_bucket", "leaky_bucket"]
HeaderFamily = Literal["ietf", "x-ratelimit", "window", "token-bucket"]
_KEY_PARTS: Final = ("ip", "consumer", "key_id", "tenant", "route", "method")
KEY_FORMS: Final = "ip, consumer, key_id, tenant, route, method, header:<name>, claim:<name>"


def parse_rate(value: str) -> tuple[int, float]:
    """``"100/min"`` → (100, 60.0); ValueError naming the accepted forms."""
    match = _RATE.match(value) if isinstance(value, str) else None
    unit = _UNIT_SECONDS.get(match.group(3).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f"expected a rate such as {RATE_FORMS}, got {value!r}")
    count = int(match.group(1))
    window = (int(match.group(2)) if match.group(2) else 1) * unit
    if count < 1 or window < 1:
        raise ValueError(f"a rate needs at least 1 request per at least 1 second, got {value!r}")
    return count, float(window)


def check_key_part(part: str) -> str:
    kind, colon, argument = part.partition(":")
    if not colon and kind in _KEY_PARTS:
        return kind
    if colon and kind == "header":
        return "header:" + check_header_name(argument).lower()
    if colon and kind == "claim" and argument and len(argument) <= 200:
        return part
    raise ValueError(f"unknown key {part!r}; keys are {KEY_FORMS}")


def _key_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


KeyParts = Annotated[list[str], BeforeValidator(_key_list)]


class LimitConfig(PolicyConfig):
    """One limit: ``rate: 100/min``, or ``limit`` per ``window``."""

    name: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="names the limit in headers and keys"
    )
    rate: str | None = Field(default=None, description=RATE_FORMS)
    limit: int | None = Field(default=None, ge=1, le=10**9)
    window: Duration | None = None
    algorithm: Algorithm | None = Field(default=None, description="default: the policy's algorithm")
    burst: int | None = Field(default=None, ge=1, le=10**9, description="token_bucket: bucket size")
    max_delay: Duration | None = Field(default=None, description="leaky_bucket: longest wait")

    @field_validator("rate")
    @classmethod
    def _check_rate(cls, rate: str | None) -> str | None:
        if rate is not None:
            parse_rate(rate)
        return rate

    @model_validator(mode="after")
    def _check_shape(self) -> LimitConfig:
        if (self.rate is None) == (self.limit is None):
            raise ValueError("give either `rate` (such as 100/min) or `limit` with `window`")
        if self.limit is not None and self.window is None:
            raise ValueError("`limit` needs a `window` (such as 60s)")
        if self.rate is not None and self.window is not None:
            raise ValueError("`window` goes with `limit`, not with `rate`")
        limit, window = self.amount()
        if window < 0.001:
            raise ValueError("`window` must be at least 1ms")
        if max(limit, self.burst or 0) * round(window * 1000) > MAX_PRODUCT:
            raise ValueError("limit x window is too large to count exactly; use a quota for long periods")
        return self

    def amount(self) -> tuple[int, float]:
        """(requests, window seconds)."""
        if self.rate is not None:
            return parse_rate(self.rate)
        assert self.limit is not None and self.window is not None
        return self.limit, self.window

    def label(self) -> str:
        """The limit's name: given, or ``100-per-60s``."""
        limit, window = self.amount()
        return self.name or f"{limit}-per-{window:g}s"


class TiersConfig(PolicyConfig):
    """Different limits per plan: the plan comes from the consumer's groups, tenant, a claim or a header."""

    by: str = Field(default="group", description="group, tenant, claim:<name> or header:<name>")
    plans: dict[str, list[LimitConfig]] = Field(min_length=1)
    default: str | None = Field(default=None, description="the plan of a request whose plan is not listed")

    @field_validator("by")
    @classmethod
    def _check_by(cls, by: str) -> str:
        if by in ("group", "tenant"):
            return by
        kind, _, argument = by.partition(":")
        if kind in ("claim", "header") and argument:
            return check_key_part(by)
        raise ValueError("expected group, tenant, claim:<name> or header:<name>")

    @model_validator(mode="after")
    def _check_default(self) -> TiersConfig:
        if self.default is not None and self.default not in self.plans:
            raise ValueError(f"`default` names no plan: {self.default!r} is not in plans")
        return self


class KeyedLimitsConfig(PolicyConfig):
    """What every counting policy shares: whose requests are counted together, and what clients see."""

    key: KeyParts = Field(default_factory=lambda: ["ip"], description=KEY_FORMS)
    fallback_key: KeyParts = Field(
        default_factory=lambda: ["ip"], description="used when a part of `key` is missing"
    )
    scope: Literal["route", "global"] = Field(
        default="route", description="route: counters per route; global: shared by every route"
    )
    headers: list[HeaderFamily] = Field(default_factory=lambda: ["ietf", "x-ratelimit"])
    backend: Literal["state", "memory", "hybrid"] = Field(
        default="state",
        description="state: the configured state backend (Redis: cluster-wide); memory: this process; "
        "hybrid: this process, merged through Redis every sync_interval",
    )
    on_redis_error: Literal["allow", "deny"] = "allow"
    max_keys: int = Field(default=1_000_000, ge=1, description="counters kept in memory at most")
    sync_interval: Duration = Field(
        default=0.1, description="backend: hybrid: how often each process merges its counts through Redis"
    )
    state_url: str | None = Field(
        default=None,
        description="a Redis of this policy's own (redis://, redis+cluster://, redis+sentinel://...) "
        "instead of state.url",
    )

    @field_validator("key", "fallback_key")
    @classmethod
    def _check_keys(cls, parts: list[str]) -> list[str]:
        return [check_key_part(part) for part in parts]

    @field_validator("on_redis_error")
    @classmethod
    def _check_on_redis_error(cls, value: str, info: ValidationInfo) -> str:
        if value == "deny" and info.data.get("backend") == "hybrid":
            raise ValueError(
                "backend: hybrid decides from each process's counts while Redis cannot answer; "
                "`on_redis_error: deny` needs backend: state"
            )
        return value

    @field_validator("state_url")
    @classmethod
    def _check_state_url(cls, url: str | None, info: ValidationInfo) -> str | None:
        if url is None:
            return None
        if info.data.get("backend") == "memory":
            raise ValueError("`state_url` names where shared counters live: not with backend: memory")
        if check_state_url(url) == "memory://":
            raise ValueError("`state_url` names a Redis; for counters in each process use backend: memory")
        return url

    @field_validator("sync_interval")
    @classmethod
    def _check_sync_interval(cls, seconds: float, info: ValidationInfo) -> float:
        if info.data.get("backend", "hybrid") != "hybrid":  # (missing: `backend` was refused itself)
            raise ValueError("`sync_interval` applies to backend: hybrid only")
        if not SYNC_INTERVAL_BOUNDS[0] <= seconds <= SYNC_INTERVAL_BOUNDS[1]:
            raise ValueError(f"`sync_interval` must be between 10ms and 60s, got {seconds:g}s")
        return seconds


class RateLimitConfig(KeyedLimitsConfig):
    algorithm: Algorithm = Field(default="sliding_window", description="of the limits that name none")
    limits: list[LimitConfig] = Field(default_factory=list)
    tiers: TiersConfig | None = None
    cost: int = Field(default=1, ge=1, le=10**6, description="units each request takes")

    @field_validator("limits")
    @classmethod
    def _check_limits(cls, limits: list[LimitConfig], info: ValidationInfo) -> list[LimitConfig]:
        check_limit_list(limits, info.data.get("algorithm", "sliding_window"), info.data.get("backend"))
        return limits

    @model_validator(mode="after")
    def _check_some(self) -> RateLimitConfig:
        if not self.limits and self.tiers is None:
            raise ValueError("give `limits` (such as [{rate: 100/min}]) or `tiers`")
        for name, limits in self.tiers.plans.items() if self.tiers else []:
            try:
                check_limit_list(limits, self.algorithm, self.backend)
            except ValueError as exc:
                raise ValueError(f"tiers.plans.{name}: {exc}") from None
        return self


class SpikeArrestConfig(KeyedLimitsConfig):
    rate: str = Field(description=RATE_FORMS)
    headers: list[HeaderFamily] = Field(default_factory=list, description="none by default")

    @field_validator("rate")
    @classmethod
    def _check_rate(cls, rate: str) -> str:
        parse_rate(rate)
        return rate

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, backend: str) -> str:
        return refuse_hybrid(
            backend,
            "spike-arrest keeps the time of every request (a sliding log), which per-process "
            "counts cannot be merged into",
        )

    def ceiling(self) -> LimitConfig:
        """The allowance as a ceiling on every short window: ``600/min`` → at most 10 in any second;
        below one a second, one per interval (``30/min`` → one in any 2 s), as Apigee smooths it."""
        count, window = parse_rate(self.rate)
        per_second = count / window
        if per_second >= 1:
            return LimitConfig(name="spike", limit=math.ceil(per_second), window=1.0, algorithm="sliding_log")
        return LimitConfig(name="spike", limit=1, window=window / count, algorithm="sliding_log")


def check_limit_list(limits: list[LimitConfig], default_algorithm: str, backend: str | None = None) -> None:
    """What one limit cannot see alone: names unique, and the fields its algorithm (and backend) needs."""
    names = [limit.label() for limit in limits]
    if len(set(names)) != len(names):
        raise ValueError("two limits have the same name; give each a `name`")
    for index, limit in enumerate(limits):
        algorithm = limit.algorithm or default_algorithm
        if backend == "hybrid" and algorithm not in HYBRID_ALGORITHMS:
            # Algorithm names are not echoed: the loader hides values of the field in its messages.
            raise ValueError(
                f"limit {index}: backend: hybrid adds up each process's counts per window, which "
                f"fixed and sliding windows keep; {_UNMERGEABLE[algorithm]}, which such counts "
                "cannot rebuild: use a window algorithm, or backend: state"
            )
        if algorithm == "leaky_bucket" and limit.max_delay is None:
            raise ValueError(f"limit {index}: a leaky bucket limit needs `max_delay` (such as 2s)")
        if algorithm != "token_bucket" and limit.burst is not None:
            raise ValueError(f"limit {index}: `burst` applies to token bucket limits only")


def refuse_hybrid(backend: str, why: str) -> str:
    """``backend``, unless it is ``hybrid``, which ``why`` says a policy cannot count with."""
    if backend == "hybrid":
        raise ValueError(f"{why}; use backend: state or memory")
    return backend
