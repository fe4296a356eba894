"""The compiled plan the engine serves: routes, upstream groups and settings as plain values.

config/compile.py builds a Plan from a validated config; the engine reads it and nothing else of
the config (no pydantic model is read per request). A reload builds a new Plan and
``Gateway.apply`` swaps one reference; requests already running keep the plan they started with.
The balancer's pick and the upstream path are built here, per request, compiled with the other
hot modules.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

# Imported at run time, not only for type checking: mypyc builds these dataclasses from their
# annotations when the module loads, so every name they use must exist then.
from apigate.engine.exchange import Exchange
from apigate.engine.replies import Reply
from apigate.engine.router import Router
from apigate.engine.upstream import ConnectionPool

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# What a policy hands the engine for each phase (policies/base.py describes the phases).
RequestHook = Callable[[Exchange], Reply | Awaitable[Reply | None] | None]
BodyHook = Callable[[Exchange, bytes], Reply | Awaitable[Reply | None] | None]
ResponseHook = Callable[[Exchange], None]
LogHook = Callable[[Exchange], None]


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
        single = self.single
        if single is not None:
            return single
        total = 0
        best = -1
        current = self._current
        targets = self.targets
        for index in range(len(targets)):
            target = targets[index]
            if target is exclude:
                continue
            current[index] += target.weight
            total += target.weight
            if best < 0 or current[index] > current[best]:
                best = index
        if best < 0:  # every target excluded: fall back to the excluded one
            assert exclude is not None
            return exclude
        current[best] -= total
        return targets[best]


@dataclass(slots=True)
class CompiledRoute:
    name: str
    path: str  # the route's path pattern, as configured
    upstream: UpstreamGroup | None  # None: a terminal policy answers every request
    prefix_strip: bool
    rewrite: tuple[tuple[bool, str], ...] | None
    preserve_host: bool
    timeout: float
    retries: int
    max_body_size: int | None
    lists_methods: bool  # the route names its methods (TRACE is served only where listed)
    policies: tuple[Any, ...]
    request_hooks: tuple[RequestHook, ...]
    response_hooks: tuple[ResponseHook, ...]
    log_hooks: tuple[LogHook, ...]
    body_hooks: tuple[BodyHook, ...] = ()
    body_limit: int = 0  # largest body the body hooks buffer
    inactive: tuple[str, ...] = ()
    upgrades: frozenset[bytes] = frozenset()  # Upgrade protocols this route tunnels (lowercase)
    description: dict[str, Any] = field(default_factory=dict)  # what /routes shows, secrets masked
    requests: int = 0  # served by this worker since the plan was compiled

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


@dataclass(frozen=True, slots=True)
class Endpoints:
    """The built-in endpoints: their paths (None: off), the bearer token, and who may read them."""

    health: str | None = "/health"
    routes: str | None = "/routes"
    stats: str | None = "/stats"
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
    inactive: dict[str, tuple[str, ...]] = field(default_factory=dict)
