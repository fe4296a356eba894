"""The ``upstreams:`` section and a route's ``retries:``: targets, balancer, health checks,
circuit breakers, retry budget and timeouts.

A balancer is chosen by name: each has a model here with the settings it takes and ``build``,
which makes the engine's balancer (engine/balancers.py). A new balancer is a class there and a
model here, added to ``BalancerConfig``; nothing else changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from apigate.config.headernames import HEADER_NAME
from apigate.config.units import Duration
from apigate.config.validators import Strict, check_http_url, env_default
from apigate.discovery.dns import DnsQuery
from apigate.discovery.registry import NAME_PATTERN
from apigate.engine.balancers import Balancer, ConsistentHash, LeastConnections, PowerOfTwoChoices, Sticky
from apigate.engine.breakers import BreakerSettings, EjectionSettings
from apigate.engine.retries import FAILURE_NAMES, RetryPolicy
from apigate.health.active import CheckSettings

if TYPE_CHECKING:
    from apigate.engine.plan import Target

_STATUS = Annotated[int, Field(ge=100, le=599)]


class TargetConfig(Strict):
    url: str
    weight: int = Field(default=1, ge=0, le=10000)

    @model_validator(mode="before")
    @classmethod
    def _from_url(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value

    _check_url = field_validator("url")(classmethod(lambda cls, v: check_http_url(v)))


class PoolConfig(Strict):
    max_connections: int = Field(default=512, ge=1, description="open connections per target")
    idle_timeout: Duration = Field(default=60.0, description="idle pooled connections are closed after this")


# -- balancers -------------------------------------------------------------------------------------
class RoundRobinConfig(Strict):
    """Smooth weighted round robin (``weighted`` is the same: weights always count)."""

    name: Literal["round_robin", "weighted"] = "round_robin"

    def build(self, targets: list[Target]) -> Balancer:
        return Balancer(targets)


class LeastConnectionsConfig(Strict):
    name: Literal["least_connections"]

    def build(self, targets: list[Target]) -> Balancer:
        return LeastConnections(targets)


class PowerOfTwoConfig(Strict):
    name: Literal["p2c"]

    def build(self, targets: list[Target]) -> Balancer:
        return PowerOfTwoChoices(targets)


class HashConfig(Strict):
    name: Literal["hash"]
    on: Literal["ip", "header", "cookie", "param"] = Field(
        default="ip", description="what the key is: the client IP, a header, a cookie or a path parameter"
    )
    key: str | None = Field(default=None, description="the header, cookie or path parameter name")

    @model_validator(mode="after")
    def _key_named(self) -> HashConfig:
        if self.on == "ip" and self.key is not None:
            raise ValueError("key is not used when hashing on ip")
        if self.on != "ip" and not self.key:
            raise ValueError(f"hashing on {self.on} needs key: the {self.on} name")
        if self.on in ("header", "cookie") and self.key and not HEADER_NAME.match(self.key):
            raise ValueError(f"key {self.key!r} is not a valid {self.on} name")
        return self

    def build(self, targets: list[Target]) -> Balancer:
        return ConsistentHash(targets, self.on, self.key or "")


class StickyConfig(Strict):
    name: Literal["sticky"]
    cookie: str = Field(default="apigate_sticky", pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")
    ttl: Duration | None = Field(default=None, description="cookie lifetime; none: a session cookie")
    secure: bool = Field(default=False, description="add the Secure attribute (HTTPS-only clients)")
    fallback: Literal["round_robin", "least_connections", "p2c"] = Field(
        default="round_robin", description="picks a target for a client without a usable pin"
    )

    def build(self, targets: list[Target]) -> Balancer:
        attributes = b"; Path=/; HttpOnly; SameSite=Lax"
        if self.ttl is not None:
            attributes += b"; Max-Age=%d" % int(self.ttl)
        if self.secure:
            attributes += b"; Secure"
        fallback = {"round_robin": Balancer, "least_connections": LeastConnections, "p2c": PowerOfTwoChoices}
        return Sticky(targets, fallback[self.fallback](targets), self.cookie, attributes)


BalancerConfig = Annotated[
    RoundRobinConfig | LeastConnectionsConfig | PowerOfTwoConfig | HashConfig | StickyConfig,
    Field(discriminator="name"),
]
BALANCER_NAMES = ("round_robin", "weighted", "least_connections", "p2c", "hash", "sticky")


# -- health ------------------------------------------------------------------------------------------
def _statuses(value: Any) -> Any:
    """Statuses as numbers or ranges: ``[200, 204]``, ``["200-399"]``."""
    if not isinstance(value, list):
        return value
    found: list[Any] = []
    for item in value:
        if isinstance(item, str) and "-" in item:
            low, _, high = item.partition("-")
            if not (low.strip().isdigit() and high.strip().isdigit()) or int(low) > int(high):
                raise ValueError(f"{item!r} is not a status range such as 200-399")
            found.extend(range(int(low), int(high) + 1))
        else:
            found.append(item)
    return found


class ActiveCheckConfig(Strict):
    """Probes run once per node (whatever the number of workers); the results reach every worker."""

    path: str = Field(default="/health", pattern=r"^/[^\s#]*$")
    interval: Duration = Field(default=10.0, gt=0)
    timeout: Duration | None = Field(
        default=None, gt=0, description="default: 2s, or the interval if shorter"
    )
    healthy_threshold: int = Field(default=2, ge=1, le=100)
    unhealthy_threshold: int = Field(default=3, ge=1, le=100)
    statuses: list[_STATUS] = Field(default_factory=lambda: list(range(200, 400)), min_length=1)
    host: str | None = Field(default=None, description="Host header of the probes; default: the target's")
    method: Literal["GET", "HEAD"] = "GET"

    _expand = field_validator("statuses", mode="before")(classmethod(lambda cls, v: _statuses(v)))

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> ActiveCheckConfig:
        if self.timeout is not None and self.timeout > self.interval:
            raise ValueError("timeout must not exceed interval")
        return self

    @property
    def probe_timeout(self) -> float:
        return self.timeout if self.timeout is not None else min(2.0, self.interval)

    def settings(self) -> CheckSettings:
        return CheckSettings(
            path=self.path,
            interval=self.interval,
            timeout=self.probe_timeout,
            healthy_threshold=self.healthy_threshold,
            unhealthy_threshold=self.unhealthy_threshold,
            expected_statuses=frozenset(self.statuses),
            host=self.host,
            method=self.method,
        )


class PassiveCheckConfig(Strict):
    """Outlier detection: consecutive failures eject a target, longer on each repeat."""

    consecutive_failures: int = Field(default=5, ge=1, le=10000)
    base_ejection: Duration = Field(default=30.0, gt=0)
    max_ejection: Duration = Field(default=300.0, gt=0)
    max_ejection_percent: int = Field(default=10, ge=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> PassiveCheckConfig:
        if self.max_ejection < self.base_ejection:
            raise ValueError("max_ejection must not be shorter than base_ejection")
        return self

    def settings(self) -> EjectionSettings:
        return EjectionSettings(
            self.consecutive_failures, self.base_ejection, self.max_ejection, self.max_ejection_percent
        )


class HealthConfig(Strict):
    active: ActiveCheckConfig | None = None
    passive: PassiveCheckConfig | None = None


class CircuitBreakerConfig(Strict):
    failures: int = Field(
        default_factory=lambda: env_default("CIRCUIT_FAILURE_THRESHOLD", 5),
        ge=0,
        le=100000,
        description="consecutive failures that open the circuit (0: not by count)",
    )
    recovery: Duration = Field(
        default_factory=lambda: env_default("CIRCUIT_RECOVERY_TIMEOUT", 30.0),
        gt=0,
        description="seconds open before half-open probes",
    )
    error_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="failed share that opens it (0: off)")
    window: Duration = Field(default=10.0, gt=0, description="the error rate's sliding window")
    min_requests: int = Field(default=20, ge=1, description="requests in the window before the rate counts")
    half_open_requests: int = Field(default=1, ge=1, le=1000)
    scope: Literal["target", "upstream", "both"] = Field(
        default="target", description="a circuit per target, one for the whole upstream, or both"
    )
    share: bool = Field(
        default=True,
        description="a target circuit that opens opens in the node's other workers, and (with a Redis "
        "state.url) in the other nodes, as a hint",
    )

    @model_validator(mode="after")
    def _opens_somehow(self) -> CircuitBreakerConfig:
        if not self.failures and not self.error_rate:
            raise ValueError("set failures or error_rate: with both 0 the circuit never opens")
        return self

    def settings(self) -> BreakerSettings:
        return BreakerSettings(
            self.failures,
            self.error_rate,
            self.window,
            self.min_requests,
            self.recovery,
            self.half_open_requests,
        )


class RetryBudgetConfig(Strict):
    ratio: float = Field(default=0.2, ge=0.0, le=10.0, description="retries per request over the window")
    window: Duration = Field(default=10.0, gt=0)
    min_per_second: float = Field(default=3.0, ge=0.0, description="retries always allowed per second")


class UpstreamTimeoutsConfig(Strict):
    """Per upstream; unset ones take ``timeouts.connect`` and ``timeouts.read``."""

    connect: Duration | None = Field(default=None, gt=0)
    first_byte: Duration | None = Field(
        default=None, gt=0, description="from the request sent to the response head"
    )
    idle: Duration | None = Field(default=None, gt=0, description="longest silence within the response")


class DnsTargetsConfig(Strict):
    """Targets from DNS, asked again as the records' TTLs pass (within min_ttl and max_ttl)."""

    name: str = Field(description="users.internal, or _http._tcp.users.internal for SRV")
    record: Literal["A", "AAAA", "A+AAAA", "SRV"] = "A"
    port: int | None = Field(default=None, ge=1, le=65535, description="for A and AAAA (SRV names its own)")
    nameservers: list[str] = Field(
        default_factory=list, description='"10.0.0.2" or "10.0.0.2:5353"; none: the system\'s'
    )
    min_ttl: Duration = Field(default=1.0, gt=0)
    max_ttl: Duration = Field(default=300.0, gt=0)
    timeout: Duration = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _valid_query(self) -> DnsTargetsConfig:
        if self.record != "SRV" and self.port is None:
            raise ValueError(f"{self.record} records name no port: set port")
        self.query()  # DnsQuery checks the rest (the name, the TTL bounds)
        return self

    def query(self) -> DnsQuery:
        servers = []
        for entry in self.nameservers:
            host, sep, port = entry.rpartition(":") if entry.count(":") == 1 else ("", "", "")
            servers.append((host, int(port)) if sep and port.isdigit() else (entry.strip("[]"), 53))
        return DnsQuery(
            self.name, self.record, self.port, tuple(servers), self.min_ttl, self.max_ttl, self.timeout
        )


class UpstreamConfig(Strict):
    targets: list[TargetConfig] = Field(default_factory=list)
    service: str | None = Field(
        default=None, pattern=NAME_PATTERN, description="targets from the registrations of this service"
    )
    dns: DnsTargetsConfig | None = Field(default=None, description="targets from DNS records")
    pool: PoolConfig = PoolConfig()
    balancer: BalancerConfig = Field(default_factory=RoundRobinConfig)
    health: HealthConfig = HealthConfig()
    circuit_breaker: CircuitBreakerConfig | None = None
    retry_budget: RetryBudgetConfig | None = Field(
        default_factory=RetryBudgetConfig, description="null: retries are limited by attempts alone"
    )
    timeouts: UpstreamTimeoutsConfig = UpstreamTimeoutsConfig()
    failure_statuses: list[_STATUS] = Field(
        default_factory=lambda: [500, 502, 503, 504],
        description="responses that count as failures for passive health and circuit breakers",
    )

    _expand = field_validator("failure_statuses", mode="before")(classmethod(lambda cls, v: _statuses(v)))

    @model_validator(mode="after")
    def _one_source_of_targets(self) -> UpstreamConfig:
        sources = [
            name
            for name, given in (("targets", self.targets), ("service", self.service), ("dns", self.dns))
            if given
        ]
        if len(sources) != 1:
            raise ValueError(
                "give one source of targets: targets, service or dns"
                + (f" (not {' and '.join(sources)})" if sources else "")
            )
        return self

    @property
    def discovered(self) -> bool:
        """Its targets come from discovery (a service or DNS), not from the config."""
        return self.service is not None or self.dns is not None

    @field_validator("balancer", mode="before")
    @classmethod
    def _balancer_by_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in BALANCER_NAMES:
                raise ValueError(f"unknown balancer {value!r}; one of {', '.join(BALANCER_NAMES)}")
            return {"name": value}
        return value


# -- a route's retries ---------------------------------------------------------------------------------
class BackoffConfig(Strict):
    base: Duration = Field(default=0.025, ge=0)
    max: Duration = Field(default=0.25, ge=0)


class RetryConfig(Strict):
    """``retries: 2`` is ``{attempts: 2}``."""

    attempts: int = Field(default_factory=lambda: env_default("MAX_RETRIES", 2), ge=0, le=10)
    retry_on: list[str | int] = Field(
        default_factory=lambda: ["connect", "reset"],
        description="failures retried: connect, reset, timeout and response statuses",
    )
    backoff: BackoffConfig = BackoffConfig()
    per_try_timeout: Duration | None = Field(default=None, gt=0)
    idempotency_header: str | None = Field(
        default=None, description="a request carrying this header is retried whatever its method"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_count(cls, value: Any) -> Any:
        return {"attempts": value} if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("retry_on")
    @classmethod
    def _check_retry_on(cls, items: list[str | int]) -> list[str | int]:
        for item in items:
            if isinstance(item, int) and not 100 <= item <= 599:
                raise ValueError(f"{item} is not an HTTP status")
            if isinstance(item, str) and item not in FAILURE_NAMES:
                raise ValueError(f"unknown failure {item!r}: connect, reset, timeout or a status such as 503")
        return items

    @field_validator("idempotency_header")
    @classmethod
    def _check_header(cls, name: str | None) -> str | None:
        if name is not None and not HEADER_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid header name")
        return name

    def policy(self) -> RetryPolicy:
        kinds = 0
        for item in self.retry_on:
            if isinstance(item, str):
                kinds |= FAILURE_NAMES[item]
        return RetryPolicy(
            attempts=self.attempts,
            on=kinds,
            statuses=frozenset(item for item in self.retry_on if isinstance(item, int)),
            backoff_base=self.backoff.base,
            backoff_max=max(self.backoff.max, self.backoff.base),
            per_try_timeout=self.per_try_timeout or 0.0,
            idempotency_header=self.idempotency_header.lower().encode() if self.idempotency_header else None,
        )
