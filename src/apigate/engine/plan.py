"""The compiled plan the engine serves: routes, upstream groups and settings as plain values.

config/compile.py builds a Plan from a validated config; the engine reads it and nothing else of
the config (no pydantic model is read per request). A reload builds a new Plan and
``Gateway.apply`` swaps one reference; requests already running keep the plan they started with.
The upstream path is built here per request, compiled with the other hot modules; the
balancers are in engine/balancers.py, target health and circuits in engine/breakers.py.
"""

from __future__ import annotations

import ipaddress
import math
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

# Imported at run time, not only for type checking: mypyc builds these dataclasses from their
# annotations when the module loads, so every name they use must exist then.
from apigate.engine.balancers import Balancer
from apigate.engine.breakers import CLOSED, Breaker, EjectionSettings, TargetState
from apigate.engine.exchange import Exchange
from apigate.engine.metrics import RouteMeter, TargetMeter
from apigate.engine.replies import Reply
from apigate.engine.retries import RetryBudget, RetryPolicy
from apigate.engine.router import Router
from apigate.engine.upstream import ConnectionPool

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# What a policy hands the engine for each phase (policies/base.py describes the phases).
RequestHook = Callable[[Exchange], Reply | Awaitable[Reply | None] | None]
BodyHook = Callable[[Exchange, bytes], Reply | Awaitable[Reply | None] | None]
# Returns None, or (on a route whose ``response_replaces`` is set) a Reply that replaces the response.
ResponseHook = Callable[[Exchange], Reply | None]
# Returns the response body's filter (an object with feed(bytes) -> bytes and end() -> bytes), or None.
ResponseBodyHook = Callable[[Exchange], Any]
LogHook = Callable[[Exchange], None]


@dataclass(slots=True)
class Target:
    """One upstream server: where to connect, what Host to send, and its kept state."""

    scheme: str
    host: str
    port: int
    host_header: bytes
    weight: int
    pool: ConnectionPool
    state: TargetState
    id: str  # opaque and stable (sticky cookies name it): a hash of the upstream and the address
    ssl: ssl.SSLContext | None = None
    meter: TargetMeter | None = None  # None: metrics are off

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    """Seconds: connecting, the first byte of the response after the request went, and the
    longest silence between bytes after that (the route's ``timeout`` bounds the whole)."""

    connect: float = 5.0
    first_byte: float = 60.0
    idle: float = 60.0


class UpstreamGroup:
    """Targets behind one name, the balancer that picks among them, and what keeps failing
    targets out of rotation: passive ejection, circuit breakers and a retry budget."""

    __slots__ = (
        "balancer",
        "breaker",
        "budget",
        "ejection",
        "fails",
        "failure_statuses",
        "monitored",
        "name",
        "single",
        "states",
        "targets",
        "timeouts",
    )

    def __init__(
        self,
        name: str,
        targets: list[Target],
        balancer: Balancer | None = None,
        timeouts: UpstreamTimeouts | None = None,
        breaker: Breaker | None = None,
        ejection: EjectionSettings | None = None,
        budget: RetryBudget | None = None,
        failure_statuses: frozenset[int] = frozenset(),
        monitored: bool = False,
    ) -> None:
        """``monitored``: results are recorded per target (passive health, circuit breakers or a
        latency-aware balancer need them); active checks alone do not need it."""
        self.name = name
        self.targets = [t for t in targets if t.weight > 0] or targets
        self.balancer = balancer if balancer is not None else Balancer(self.targets)
        self.timeouts = timeouts if timeouts is not None else UpstreamTimeouts()
        self.breaker = breaker
        self.ejection = ejection
        self.budget = budget
        self.failure_statuses = failure_statuses
        # By status: is it a failure? (a list index per response, not a set lookup)
        self.fails = [status in failure_statuses for status in range(600)]
        self.monitored = monitored or breaker is not None
        self.states = [t.state for t in self.targets]
        # The only target of a plain upstream: the proxy skips the balancer (one call fewer per
        # request). A single target that can be ejected or cut off goes through the balancer.
        plain = len(self.targets) == 1 and not monitored and self.targets[0].state.breaker is None
        self.single = self.targets[0] if plain and type(self.balancer) is Balancer else None

    def pick(self, exchange: Exchange, exclude: Target | None, now: float) -> Target | None:
        return self.balancer.pick(exchange, exclude, now)

    def succeeded(self, target: Target, now: float, latency: float) -> None:
        state = target.state
        state.note_latency(latency, now)
        state.succeeded(now)
        breaker = self.breaker
        if breaker is not None:
            breaker.success(now)

    def failed(self, target: Target, now: float) -> None:
        target.state.failed(now, self.ejection, self.states)
        breaker = self.breaker
        if breaker is not None:
            breaker.failure(now)

    def retry_after(self, now: float) -> int:
        """Whole seconds until a target may take requests again (for Retry-After), at least 1."""
        soonest = min((t.state.retry_after(now) for t in self.targets), default=1.0)
        if self.breaker is not None and self.breaker.state != CLOSED:
            soonest = max(soonest, self.breaker.open_until - now)
        return max(1, math.ceil(soonest))


@dataclass(slots=True)
class CompiledRoute:
    name: str
    path: str  # the route's path pattern, as configured
    upstream: UpstreamGroup | None  # None: a terminal policy answers every request
    prefix_strip: bool
    rewrite: tuple[tuple[bool, str], ...] | None
    preserve_host: bool
    timeout: float
    retry: RetryPolicy
    max_body_size: int | None
    lists_methods: bool  # the route names its methods (TRACE is served only where listed)
    policies: tuple[Any, ...]
    request_hooks: tuple[RequestHook, ...]
    response_hooks: tuple[ResponseHook, ...]
    log_hooks: tuple[LogHook, ...]
    body_hooks: tuple[BodyHook, ...] = ()
    body_limit: int = 0  # largest body the body hooks buffer
    response_body_hooks: tuple[ResponseBodyHook, ...] = ()  # in the order the response meets them
    # A larger body skips the body hooks and streams on unchanged (every body policy of the
    # route lets such bodies pass), instead of 413.
    oversized_body_streams: bool = False
    inactive: tuple[str, ...] = ()
    upgrades: frozenset[bytes] = frozenset()  # Upgrade protocols this route tunnels (lowercase)
    # A response hook may hand back a Reply that replaces the response it sees (the upstream's, or
    # the gateway's own error): the engine looks at what the hooks return only on such routes.
    response_replaces: bool = False
    meter: RouteMeter | None = None  # None: metrics are off
    description: dict[str, Any] = field(default_factory=dict)  # what /routes shows, secrets masked

    def upstream_path(
        self, path: str, params: dict[str, str], remainder: str | None, prefix: str | None
    ) -> str:
        rewrite = self.rewrite
        if rewrite is not None:
            values = dict(params)
            values["path"] = (remainder or "/").lstrip("/")
            return "".join([values[text] if is_param else text for is_param, text in rewrite])
        if self.prefix_strip and remainder is not None:
            return remainder
        return path


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds (see the config reference: ``timeouts``)."""

    connect: float = 5.0
    read: float = 60.0
    keepalive: float = 75.0
    header: float = 60.0
    body_idle: float = 30.0
    drain: float = 30.0
    drain_notice: float = 0.0


@dataclass(frozen=True, slots=True)
class Endpoints:
    """The built-in endpoints: their paths (None: off), the bearer token, and who may read them."""

    health: str | None = "/health"
    health_detailed: str | None = "/health/detailed"
    routes: str | None = "/routes"
    stats: str | None = "/stats"
    metrics: str | None = "/metrics"
    metrics_prometheus: str | None = None
    token: bytes | None = None
    allow: tuple[Network, ...] | None = None  # None: any client address


@dataclass(slots=True)
class Plan:
    router: Router
    routes: tuple[CompiledRoute, ...]
    trusted_proxies: tuple[Network, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    endpoints: Endpoints = field(default_factory=Endpoints)
    max_header_bytes: int = 32 * 1024
    unescape_slashes: bool = False
    # Shorthands not active, by route: (shorthand, why and what the route does meanwhile).
    inactive: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    upstreams: tuple[UpstreamGroup, ...] = ()  # every upstream group, named or a route's target
    # Called for every finished exchange, routed or not (access log, usage, events), and for the
    # sampled ones (spans): the process builds them from the config; the engine knows only that
    # they take the exchange.
    finish_hooks: tuple[LogHook, ...] = ()
    sampled_hooks: tuple[LogHook, ...] = ()  # called only for the exchanges whose trace is sampled
    unrouted: RouteMeter | None = None  # what counts requests no route matched (None: metrics off)
    trace_sample_ratio: float = 0.0  # of new traces, the share marked sampled (engine/tracing.py)
