"""Typed configuration: what a YAML file may say, validated before anything runs.

Checks that need more than one model or the policy registry (upstream names, route
destinations, policy names and their configs) live in ``config/check.py``, so that this module
depends on no policy and every problem is reported with its field path.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from apigate.config.accesslog import AccessLogConfig
from apigate.config.events import EventsConfig
from apigate.config.headernames import HEADER_NAME
from apigate.config.metrics import MetricsConfig
from apigate.config.tracing import TracingConfig
from apigate.config.units import ByteSize, Duration
from apigate.config.upstreams import RetryConfig, UpstreamConfig
from apigate.config.usage import UsageConfig
from apigate.config.validators import Strict, check_http_url, check_redis_url, env_default
from apigate.engine.paths import PathRefused, normalize_path
from apigate.state.urls import check_state_url
from apigate.webhooks.config import WebhooksConfig

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
_PARAM = re.compile(r"^\{[A-Za-z_][A-Za-z0-9_]*\}$")
_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*(:\d+)?$")


def _is_routable(segment: str, last: bool) -> bool:
    """Whether a route segment can meet a request path in its normal form (engine/paths.py)."""
    if segment == "*" or _PARAM.match(segment):
        return True
    if not segment:
        return last  # only a trailing slash leaves an empty segment
    try:
        return ";" not in segment and normalize_path("/" + segment) == "/" + segment
    except PathRefused:
        return False


def _networks(value: Any) -> Any:
    """Addresses and networks as written (``10.0.0.1``, ``10.0.0.0/8``), host bits allowed."""
    if isinstance(value, list):
        return [ipaddress.ip_network(v, strict=False) if isinstance(v, str) else v for v in value]
    return value


class ListenConfig(Strict):
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)

    @model_validator(mode="before")
    @classmethod
    def _from_short_form(cls, value: Any) -> Any:
        """Accepts ``8000``, ``":8000"``, ``"127.0.0.1:8000"`` and ``"[::1]:8000"``."""
        if isinstance(value, int) and not isinstance(value, bool):
            return {"port": value}
        if isinstance(value, str) and value.strip().isdigit():
            return {"port": int(value)}
        if isinstance(value, str):
            host, sep, port = value.rpartition(":")
            if not sep or not port.isdigit():
                raise ValueError("expected host:port, :port or a port number")
            return {"host": host.strip("[]") or "0.0.0.0", "port": int(port)}
        return value


class TimeoutsConfig(Strict):
    connect: Duration = 5.0
    read: Duration = Field(
        default=60.0,
        description="default first_byte and idle of upstreams: the longest wait for a response to begin, "
        "and the longest silence within it",
    )
    keepalive: Duration = Field(default=75.0, description="idle client connections are closed after this")
    header: Duration = Field(
        default=60.0, description="a request head must arrive whole within this, or 408 and close"
    )
    body_idle: Duration = Field(
        default=30.0, description="longest silence between request body bytes, or 408 and close"
    )
    drain: Duration = Field(default=30.0, description="how long SIGTERM waits for in-flight requests")
    drain_notice: Duration = Field(
        default=0.0,
        description="after SIGTERM, keep serving this long while /health/detailed says not ready, so "
        "load balancers stop sending before the listener closes",
    )


class LimitsConfig(Strict):
    max_header_bytes: ByteSize = Field(default=32 * 1024, ge=1024)
    max_body_size: ByteSize | None = Field(default=None, description="default request body limit")


class PathsConfig(Strict):
    """How request paths are normalised before routing (engine/paths.py)."""

    escaped_slashes: Literal["reject", "unescape"] = Field(
        default="reject",
        description="%2F or %5C in a path: reject answers 400; unescape routes and forwards it as /",
    )


class EndpointsConfig(Strict):
    """The built-in endpoints on the proxy listener (/health, /routes, /stats, as routes.yaml files
    written for the Pactown gateway expect them)."""

    health: str | None = "/health"
    health_detailed: str | None = Field(
        default="/health/detailed", description="upstreams, circuits, store and state; guarded as stats is"
    )
    routes: str | None = "/routes"
    stats: str | None = "/stats"
    metrics: str | None = Field(default="/metrics", description="counts and latency percentiles, JSON")
    metrics_prometheus: str | None = Field(
        default=None, description="the Prometheus text on the proxy listener too (e.g. /metrics/prometheus)"
    )
    token: SecretStr | None = Field(default=None, description="bearer token required for routes and stats")
    allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = Field(
        default=None,
        description="client networks that may read routes and stats; "
        "default: loopback and trusted_proxies without a token, any with one",
    )

    @field_validator("token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("allow", mode="before")
    @classmethod
    def _allow_networks(cls, value: Any) -> Any:
        return _networks(value)


class DiscoveryRedisConfig(Strict):
    """Registrations services write to Redis themselves (docs/discovery.md has the format)."""

    url: str = Field(description="redis://host:6379/0")
    prefix: str = Field(default="apigate:", max_length=100)
    poll_interval: Duration = Field(default=2.0, gt=0, description="how often the node reads them")

    _redis_url = field_validator("url")(classmethod(lambda cls, v: check_redis_url(v)))


class DiscoveryConfig(Strict):
    allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=list,
        description="where registered services may be; internal ranges must be listed themselves",
    )
    redis: DiscoveryRedisConfig | None = None

    _strict_networks = field_validator("allowed_networks", mode="before")(
        classmethod(lambda cls, v: _networks(v))
    )


class AdminConfig(Strict):
    """The admin listener: operations endpoints on their own port, never on the proxy's."""

    listen: ListenConfig = Field(
        default_factory=lambda: ListenConfig.model_validate(
            os.environ.get("APIGATE_ADMIN_LISTEN", "127.0.0.1:8001")
        ),
        description="default $APIGATE_ADMIN_LISTEN, else 127.0.0.1:8001",
    )
    token: SecretStr | None = Field(
        default_factory=lambda: (
            SecretStr(os.environ["APIGATE_ADMIN_TOKEN"]) if os.environ.get("APIGATE_ADMIN_TOKEN") else None
        ),
        description="bearer token the admin endpoints require; default $APIGATE_ADMIN_TOKEN. "
        "Without one the listener binds loopback only",
    )

    _empty_token_is_none = field_validator("token", mode="before")(
        classmethod(lambda cls, v: None if v == "" else v)
    )


class StoreConfig(Strict):
    """Where durable entities live: SQLite (default, embedded) or PostgreSQL (a cluster)."""

    url: str = Field(
        default_factory=lambda: os.environ.get("APIGATE_STORE_URL", "sqlite:///apigate.db"),
        description="sqlite:///path.db or postgresql://user@host:5432/db",
    )
    poll_interval: Duration = Field(default=0.5, description="how often workers look for changes")

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return url


class StateConfig(Strict):
    """Where hot, short-lived state lives: memory (each process its own), or Redis or a Redis Cluster
    (shared by a cluster of gateways)."""

    url: str = Field(
        default_factory=lambda: os.environ.get("APIGATE_STATE_URL", "memory://"),
        description="memory://, redis://host:6379/0 or redis+cluster://host:7000,host:7001",
    )

    _check_url = field_validator("url")(classmethod(lambda cls, v: check_state_url(v)))


class DeclaredKeyConfig(Strict):
    """An API key written in the config (for example from an environment variable)."""

    key: SecretStr = Field(min_length=16)
    scopes: list[str] = Field(default_factory=list)
    allowed_cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)
    time_windows: list[str] = Field(default_factory=list)
    expires_at: float | None = None

    @field_validator("time_windows")
    @classmethod
    def _check_windows(cls, windows: list[str]) -> list[str]:
        from apigate.consumers.windows import check_windows  # the grammar lives with the consumers

        return check_windows(windows)


class ConsumerConfig(Strict):
    """A consumer declared in the config; runtime ones are created with `apigate consumers`."""

    id: str = Field(min_length=1, max_length=200)
    tenant: str | None = None
    groups: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    keys: list[DeclaredKeyConfig] = Field(default_factory=list)
    password_hash: str | None = Field(
        default=None, description="for basic-auth (username = id): output of `apigate hash-password`"
    )

    @field_validator("password_hash")
    @classmethod
    def _check_password_hash(cls, value: str | None) -> str | None:
        if value is not None:
            from apigate.consumers.passwords import parse_hash  # the format lives with the consumers

            parse_hash(value)
        return value


# The route keys that stand for a policy, in the order /routes lists those that are inactive.
ROUTE_SHORTHANDS = ("auth", "rate_limit", "cache")


class RouteConfig(Strict):
    name: str | None = None
    path: str
    host: list[str] | None = None
    methods: list[str] | None = None
    headers: dict[str, str] | None = Field(default=None, description='header conditions; "*" = present')
    target: str | None = None
    upstream: str | None = None
    strip_prefix: bool = False
    rewrite: str | None = Field(default=None, description="upstream path template: {param}, {path}")
    preserve_host: bool = False
    timeout: Duration = Field(default_factory=lambda: env_default("DEFAULT_TIMEOUT", 30.0))
    retries: RetryConfig = Field(default_factory=RetryConfig, description="a count, or attempts and retry_on")
    max_body_size: ByteSize | None = None
    upgrades: list[str] = Field(
        default_factory=lambda: ["websocket"], description="Upgrade protocols tunneled to the upstream"
    )
    policies: dict[str, dict[str, Any] | None] = Field(default_factory=dict)
    # Shorthands of routes.yaml files written for the Pactown gateway (ROUTE_SHORTHANDS): each
    # stands for the policy that declares it, and is reported inactive while none does.
    auth: str | None = None
    rate_limit: str | None = None
    cache: str | None = None

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError("must start with /")
        segments = path.split("/")[1:]
        for index, segment in enumerate(segments):
            if "*" in segment and (segment != "*" or index != len(segments) - 1):
                raise ValueError("* is allowed only as the whole last segment, as in /api/*")
            if ("{" in segment or "}" in segment) and not _PARAM.match(segment):
                raise ValueError(f"segment {segment!r} must be a whole parameter such as {{id}}")
            if not _is_routable(segment, index == len(segments) - 1):
                raise ValueError(
                    f"segment {segment!r} is not in the normal form requests are routed in "
                    "(no empty, . or .. segment, no ;, escapes only of reserved characters in upper case)"
                )
        names = [s[1:-1] for s in segments if _PARAM.match(s)]
        if len(names) != len(set(names)):
            raise ValueError("parameter names must be unique within a path")
        return path

    @field_validator("host", "methods", mode="before")
    @classmethod
    def _one_or_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("host")
    @classmethod
    def _check_hosts(cls, hosts: list[str] | None) -> list[str] | None:
        if hosts is None:
            return None
        for host in hosts:
            if not _HOST.match(host):
                raise ValueError(f"{host!r} is not a host name or *.domain pattern")
        return [h.lower() for h in hosts]

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, methods: list[str] | None) -> list[str] | None:
        if methods is None:
            return None
        upper = [m.upper() for m in methods]
        unknown = [m for m in upper if m not in HTTP_METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}")
        return upper

    @field_validator("upgrades")
    @classmethod
    def _check_upgrades(cls, upgrades: list[str]) -> list[str]:
        for protocol in upgrades:
            if not HEADER_NAME.match(protocol):  # a protocol name is a token, as a header name is
                raise ValueError(f"{protocol!r} is not a protocol name such as websocket")
        return [p.lower() for p in upgrades]

    @field_validator("headers")
    @classmethod
    def _check_header_names(cls, headers: dict[str, str] | None) -> dict[str, str] | None:
        if headers is None:
            return None
        for name in headers:
            if not HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
        return {name.lower(): value for name, value in headers.items()}

    @field_validator("target")
    @classmethod
    def _check_target(cls, target: str | None) -> str | None:
        return None if target is None else check_http_url(target)

    @field_validator("rewrite")
    @classmethod
    def _check_rewrite(cls, rewrite: str | None) -> str | None:
        if rewrite is not None and not rewrite.startswith("/"):
            raise ValueError("must start with /")
        return rewrite

    @model_validator(mode="after")
    def _one_destination(self) -> RouteConfig:
        if self.target is not None and self.upstream is not None:
            raise ValueError("a route takes one of target or upstream, not both")
        if self.strip_prefix and not self.path.endswith("/*"):
            raise ValueError("strip_prefix applies to prefix paths ending in /*")
        if self.rewrite:
            known = {s[1:-1] for s in self.path.split("/") if _PARAM.match(s)} | {"path"}
            for name in re.findall(r"\{([^}]*)\}", self.rewrite):
                if name not in known:
                    raise ValueError(f"rewrite uses {{{name}}}, which the path does not define")
        return self

    @property
    def display_name(self) -> str:
        return self.name or self.path


class GatewayConfig(Strict):
    listen: ListenConfig = Field(default_factory=lambda: ListenConfig(port=env_default("PORT", 8000)))
    workers: int = Field(default=1, ge=1, le=256)
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)
    timeouts: TimeoutsConfig = TimeoutsConfig()
    limits: LimitsConfig = LimitsConfig()
    paths: PathsConfig = PathsConfig()
    endpoints: EndpointsConfig = EndpointsConfig()
    metrics: MetricsConfig = MetricsConfig()
    tracing: TracingConfig = TracingConfig()
    events: EventsConfig = EventsConfig()
    admin: AdminConfig | None = Field(default_factory=AdminConfig, description="null: no admin listener")
    discovery: DiscoveryConfig = DiscoveryConfig()
    store: StoreConfig = Field(default_factory=StoreConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    consumers: list[ConsumerConfig] = Field(default_factory=list)
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    plugins: list[str] = Field(
        default_factory=list, description="importable modules that register policies of your own"
    )
    policies: dict[str, dict[str, Any] | None] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)
    webhooks: WebhooksConfig = WebhooksConfig()
    usage: UsageConfig = UsageConfig()
    access_log: AccessLogConfig = AccessLogConfig(enabled=False)

    _strict_networks = field_validator("trusted_proxies", mode="before")(
        classmethod(lambda cls, v: _networks(v))
    )
