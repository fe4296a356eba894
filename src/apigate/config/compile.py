"""Compile a validated GatewayConfig into one immutable Snapshot the data plane reads.

Everything that can be decided before traffic arrives is decided here: the route table,
each route's policy chain split by phase, upstream groups with their balancers and pools,
rewrite templates and header byte strings. A reload builds a new Snapshot and swaps one
reference; requests already running keep the snapshot they started with.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from apigate.config.models import GatewayConfig, RouteConfig, UpstreamConfig
from apigate.engine.router import RouteEntry, Router
from apigate.policies.base import Policy
from apigate.policies.registry import build_policy, registry, validate_policy_config
from apigate.webhooks.routes import source_routes

if TYPE_CHECKING:
    from apigate.engine.upstream import ConnectionPool, PoolManager
    from apigate.services import Services

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _auth_shorthand(value: str) -> tuple[str, dict[str, Any]]:
    """``auth: jwt`` names a policy; the Pactown gateway's webhook schemes name a preset and its variable."""
    from apigate.webhooks.verify import shorthand_scheme

    try:
        scheme = shorthand_scheme(value, os.environ)
    except ValueError:
        return ("webhook-verify", {})  # the secret's variable is unset: not active (fails closed)
    if scheme is None:
        return (value.replace("_", "-"), {})
    return ("webhook-verify", {"verify": scheme.model_dump()})


# The route shorthands of routes.yaml files written for the Pactown gateway, and the policy each stands for.
SHORTHANDS: dict[str, Callable[[str], tuple[str, dict[str, Any]]]] = {
    "auth": _auth_shorthand,
    "rate_limit": lambda value: ("rate-limit", {"limit": value}),
    "cache": lambda value: ("cache", {"ttl": value}),
}


@dataclass(slots=True)
class Target:
    """One upstream server: where to connect and what Host to send."""

    scheme: str
    host: str
    port: int
    host_header: bytes
    weight: int
    pool: ConnectionPool
    ssl: ssl.SSLContext | None = None


class UpstreamGroup:
    """Targets behind one name; smooth weighted round robin (as nginx does) picks one per request."""

    __slots__ = ("_current", "name", "single", "targets")

    def __init__(self, name: str, targets: list[Target]) -> None:
        self.name = name
        self.targets = [t for t in targets if t.weight > 0] or targets
        # The only target, if there is one: the proxy then skips pick() (one call fewer per request).
        self.single = self.targets[0] if len(self.targets) == 1 else None
        self._current = [0] * len(self.targets)

    def pick(self, exclude: Target | None = None) -> Target:
        if self.single is not None:
            return self.single
        total = 0
        best = -1
        current = self._current
        for index, target in enumerate(self.targets):
            if target is exclude:
                continue
            current[index] += target.weight
            total += target.weight
            if best < 0 or current[index] > current[best]:
                best = index
        if best < 0:  # every target excluded: fall back to the excluded one
            return exclude  # type: ignore[return-value]
        current[best] -= total
        return self.targets[best]


@dataclass(slots=True)
class CompiledRoute:
    name: str
    config: RouteConfig
    upstream: UpstreamGroup | None  # None: a terminal policy answers every request
    prefix_strip: bool
    rewrite: tuple[tuple[bool, str], ...] | None
    preserve_host: bool
    timeout: float
    retries: int
    max_body_size: int | None
    policies: tuple[Policy, ...]
    request_hooks: tuple[Callable[..., Any], ...]
    response_hooks: tuple[Callable[..., Any], ...]
    log_hooks: tuple[Callable[..., Any], ...]
    body_hooks: tuple[Callable[..., Any], ...] = ()
    body_limit: int = 0  # largest body the body hooks buffer
    inactive: tuple[str, ...] = ()
    upgrades: frozenset[bytes] = frozenset()  # Upgrade protocols this route tunnels (lowercase)
    requests: int = 0  # served by this worker since the snapshot was compiled

    def upstream_path(
        self, path: str, params: dict[str, str], remainder: str | None, prefix: str | None
    ) -> str:
        if self.rewrite is not None:
            values = dict(params)
            values["path"] = (remainder or "/").lstrip("/")
            return "".join(values[text] if is_param else text for is_param, text in self.rewrite)
        if self.prefix_strip and remainder is not None:
            return remainder
        return path


@dataclass(slots=True)
class Snapshot:
    config: GatewayConfig
    router: Router
    routes: tuple[CompiledRoute, ...]
    trusted_proxies: tuple[Network, ...]
    inactive: dict[str, tuple[str, ...]] = field(default_factory=dict)
    needs: frozenset[str] = frozenset()  # shared services some policy of this snapshot uses


def _compile_rewrite(template: str | None) -> tuple[tuple[bool, str], ...] | None:
    if template is None:
        return None
    parts: list[tuple[bool, str]] = []
    for index, piece in enumerate(re.split(r"\{([^}]*)\}", template)):
        if piece:
            parts.append((index % 2 == 1, piece))
    return tuple(parts)


def _make_target(url: str, weight: int, pool_config: Any, pools: PoolManager) -> Target:
    parts = urlsplit(url)
    scheme = parts.scheme
    host = parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    default_port = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
    host_for_header = f"[{host}]" if ":" in host else host
    host_header = (host_for_header if default_port else f"{host_for_header}:{port}").encode()
    tls = ssl.create_default_context() if scheme == "https" else None
    pool = pools.pool_for(scheme, host, port, tls, pool_config)
    return Target(scheme, host, port, host_header, weight, pool, tls)


def _policy_chain(
    global_raw: dict[str, Any], route: RouteConfig, services: Services | None
) -> tuple[tuple[Policy, ...], tuple[str, ...]]:
    """Global policies, overridden by the route's own config for the same name; shorthands resolved."""
    raw: dict[str, Any] = dict(global_raw)
    raw.update(route.policies)
    inactive: list[str] = []
    known = registry()
    for key, expand in SHORTHANDS.items():
        value = getattr(route, key)
        if value is None:
            continue
        name, cfg = expand(value)
        if name in raw:
            continue  # the policy is configured by name: the shorthand adds nothing
        if name in known and not validate_policy_config(name, cfg, ()):
            raw[name] = cfg
        else:
            inactive.append(f"{key}: {value}")  # no such policy yet, or it needs settings (jwt: keys)
            if key == "auth":  # a route meant to be authenticated is closed, never served open
                raw["request-termination"] = {
                    "status": 503,
                    "reason": "auth_not_configured",
                    "message": f"auth: {value} is not configured on this route",
                }
    policies = sorted(
        (build_policy(name, cfg, services) for name, cfg in raw.items()), key=lambda p: (p.order, p.name)
    )
    return tuple(policies), tuple(inactive)


def _hooks(policies: tuple[Policy, ...], phase: str) -> tuple[Callable[..., Any], ...]:
    """Bound hooks for the policies that override ``phase``; the others cost nothing."""
    base = getattr(Policy, phase)
    return tuple(getattr(p, phase) for p in policies if getattr(type(p), phase) is not base)


def compile_snapshot(config: GatewayConfig, pools: PoolManager, services: Services | None = None) -> Snapshot:
    groups: dict[str, UpstreamGroup] = {}
    for name, upstream in config.upstreams.items():
        groups[name] = _group(name, upstream, pools)

    compiled: list[CompiledRoute] = []
    entries: list[RouteEntry] = []
    inactive: dict[str, tuple[str, ...]] = {}
    for order, route in enumerate([*config.routes, *source_routes(config)]):
        group: UpstreamGroup | None = None
        if route.upstream is not None:
            group = groups[route.upstream]
        elif route.target is not None:
            group = _group(route.display_name, UpstreamConfig(targets=[{"url": route.target}]), pools)
        policies, route_inactive = _policy_chain(config.policies, route, services)
        request_hooks = _hooks(policies, "on_request")
        body_policies = [p for p in policies if p.reads_body]
        body_hooks = _hooks(tuple(body_policies), "on_body")
        max_body = route.max_body_size if route.max_body_size is not None else config.limits.max_body_size
        body_limit = max((p.body_limit for p in body_policies if p.on_body in body_hooks), default=0)
        if max_body is not None:
            body_limit = min(body_limit, max_body)
        item = CompiledRoute(
            name=route.display_name,
            config=route,
            upstream=group,
            prefix_strip=route.strip_prefix,
            rewrite=_compile_rewrite(route.rewrite),
            preserve_host=route.preserve_host,
            timeout=route.timeout,
            retries=route.retries,
            max_body_size=max_body,
            policies=policies,
            request_hooks=request_hooks,
            response_hooks=tuple(reversed(_hooks(policies, "on_response"))),
            log_hooks=_hooks(policies, "on_log"),
            body_hooks=body_hooks,
            body_limit=body_limit,
            inactive=route_inactive,
            upgrades=frozenset(p.encode() for p in route.upgrades),
        )
        if route_inactive:
            inactive[item.name] = route_inactive
        compiled.append(item)
        entries.append(
            RouteEntry(
                path=route.path,
                payload=item,
                hosts=tuple(route.host or ()),
                methods=frozenset(route.methods) if route.methods else None,
                headers=tuple(
                    (name.encode(), None if value == "*" else value.encode())
                    for name, value in (route.headers or {}).items()
                ),
                order=order,
            )
        )
    return Snapshot(
        config=config,
        router=Router(entries),
        routes=tuple(compiled),
        trusted_proxies=tuple(config.trusted_proxies),
        inactive=inactive,
        needs=frozenset().union(*(p.needs for r in compiled for p in r.policies)),
    )


def _group(name: str, upstream: UpstreamConfig, pools: PoolManager) -> UpstreamGroup:
    targets = [_make_target(t.url, t.weight, upstream.pool, pools) for t in upstream.targets]
    return UpstreamGroup(name, targets)
