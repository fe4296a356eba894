"""Typed configuration: what a YAML file may say, validated before anything runs.

Cross-field checks that need more than one model (upstream names, policy names and their
configs) live in ``semantic_issues`` so that every problem is reported with its field path.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from apigate.config.headernames import HEADER_NAME
from apigate.config.units import ByteSize, Duration
from apigate.engine.paths import PathRefused, normalize_path

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


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently disable a setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw else default
    except ValueError:
        return default


def check_http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not parts.hostname:
        raise ValueError("must name a host, for example http://127.0.0.1:9000")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ValueError("has an invalid port") from exc
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query string or fragment")
    return url


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


class UpstreamConfig(Strict):
    targets: list[TargetConfig] = Field(min_length=1)
    pool: PoolConfig = PoolConfig()


class TimeoutsConfig(Strict):
    connect: Duration = 5.0
    read: Duration = Field(default=60.0, description="longest wait for the upstream's next bytes")
    keepalive: Duration = Field(default=75.0, description="idle client connections are closed after this")
    header: Duration = Field(
        default=60.0, description="a request head must arrive whole within this, or 408 and close"
    )
    body_idle: Duration = Field(
        default=30.0, description="longest silence between request body bytes, or 408 and close"
    )
    drain: Duration = Field(default=30.0, description="how long SIGTERM waits for in-flight requests")


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
    """The built-in endpoints on the proxy listener (the Pactown gateway's /health, /routes, /stats)."""

    health: str | None = "/health"
    routes: str | None = "/routes"
    stats: str | None = "/stats"
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
    """Where hot, short-lived state lives: memory (each process its own) or Redis (one for a cluster)."""

    url: str = Field(
        default_factory=lambda: os.environ.get("APIGATE_STATE_URL", "memory://"),
        description="memory:// or redis://host:6379/0",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if url != "memory://" and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be memory:// or start with redis://, rediss:// or unix://")
        return url


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
    timeout: Duration = Field(default_factory=lambda: _env_float("DEFAULT_TIMEOUT", 30.0))
    retries: int = Field(default_factory=lambda: _env_int("MAX_RETRIES", 2), ge=0, le=10)
    max_body_size: ByteSize | None = None
    upgrades: list[str] = Field(
        default_factory=lambda: ["websocket"], description="Upgrade protocols tunneled to the upstream"
    )
    policies: dict[str, dict[str, Any] | None] = Field(default_factory=dict)
    # Shorthands of routes.yaml files written for the Pactown gateway, mapped onto policies when available.
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

    @field_validator("host", mode="before")
    @classmethod
    def _host_list(cls, value: Any) -> Any:
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

    @field_validator("methods", mode="before")
    @classmethod
    def _method_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

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
        if self.target is None and self.upstream is None and not _answers_itself(self.policies):
            raise ValueError("a route needs a target or an upstream (or a policy that answers itself)")
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
    listen: ListenConfig = Field(default_factory=lambda: ListenConfig(port=_env_int("PORT", 8000)))
    workers: int = Field(default=1, ge=1, le=256)
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)
    timeouts: TimeoutsConfig = TimeoutsConfig()
    limits: LimitsConfig = LimitsConfig()
    paths: PathsConfig = PathsConfig()
    endpoints: EndpointsConfig = EndpointsConfig()
    store: StoreConfig = Field(default_factory=StoreConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    consumers: list[ConsumerConfig] = Field(default_factory=list)
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    plugins: list[str] = Field(
        default_factory=list, description="importable modules that register policies of your own"
    )
    policies: dict[str, dict[str, Any] | None] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)
    webhooks: WebhooksConfig = Field(default_factory=lambda: WebhooksConfig())

    _strict_networks = field_validator("trusted_proxies", mode="before")(
        classmethod(lambda cls, v: _networks(v))
    )


class ConfigIssue(BaseModel):
    """One problem with a config, located by its field path (and line, once the loader knows it)."""

    loc: tuple[str | int, ...]
    message: str
    line: int | None = None

    def path(self) -> str:
        out = ""
        for part in self.loc:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
        return out or "(top level)"

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.path()}: {self.message}"


def semantic_issues(data: dict[str, Any]) -> list[ConfigIssue]:
    """Checks that span models: upstream references, route names, policy names and configs.

    Works on the raw data, so it runs even when field validation failed and a config's
    problems are all reported at once. Values of the wrong type are left to field validation.
    """
    from apigate.policies.registry import validate_policy_config

    issues: list[ConfigIssue] = []
    upstreams = data.get("upstreams")
    known_upstreams = set(upstreams) if isinstance(upstreams, dict) else set()
    routes = data.get("routes")
    seen_names: dict[str, int] = {}
    for index, route in enumerate(routes if isinstance(routes, list) else []):
        if not isinstance(route, dict):
            continue
        loc: tuple[str | int, ...] = ("routes", index)
        upstream = route.get("upstream")
        if isinstance(upstream, str) and upstream not in known_upstreams:
            issues.append(ConfigIssue(loc=(*loc, "upstream"), message=f"no upstream named {upstream!r}"))
        name = route.get("name")
        if isinstance(name, str):
            if name in seen_names:
                issues.append(
                    ConfigIssue(
                        loc=(*loc, "name"),
                        message=f"route name {name!r} is already used by routes[{seen_names[name]}]",
                    )
                )
            seen_names.setdefault(name, index)
        issues.extend(_policy_issues(route.get("policies"), (*loc, "policies"), validate_policy_config))
    issues.extend(_policy_issues(data.get("policies"), ("policies",), validate_policy_config))
    return issues


def _answers_itself(policies: Any) -> bool:
    from apigate.policies.registry import registry

    known = registry()
    return isinstance(policies, dict) and any(name in known and known[name].terminal for name in policies)


def _policy_issues(policies: Any, loc: tuple[str | int, ...], validate: Any) -> list[ConfigIssue]:
    if not isinstance(policies, dict):
        return []
    issues: list[ConfigIssue] = []
    for name, raw in policies.items():
        if raw is None or isinstance(raw, dict):
            issues.extend(validate(str(name), raw, (*loc, name)))
    return issues


# -- webhooks: its models build on the ones above, so the section is bound once they exist --------
from apigate.webhooks.config import WebhooksConfig  # noqa: E402

GatewayConfig.model_rebuild()
