"""Compile a validated GatewayConfig into the engine's Plan (engine/plan.py).

Everything that can be decided before traffic arrives is decided here: the route table,
each route's policy chain split by phase, upstream groups with their balancers and pools,
rewrite templates, header byte strings, timeouts as seconds and what /routes shows. The
process applies the Plan to the gateway (one reference swapped); the engine never sees the config.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from apigate.config.models import ROUTE_SHORTHANDS, GatewayConfig, RouteConfig
from apigate.config.templates import path_template
from apigate.config.upstreams import TargetConfig, UpstreamConfig
from apigate.engine.balancers import stable_hash
from apigate.engine.breakers import TargetStates
from apigate.engine.metrics import Meters, RouteMeter
from apigate.engine.plan import (
    CompiledRoute,
    Endpoints,
    LogHook,
    Network,
    Plan,
    Target,
    Timeouts,
    UpstreamGroup,
    UpstreamTimeouts,
)
from apigate.engine.router import RouteEntry, Router
from apigate.httpspec import host_field
from apigate.policies.base import Phase, Policy
from apigate.policies.registry import build_policy, registry, shorthand_policies, validate_policy_config
from apigate.webhooks.routes import source_routes

if TYPE_CHECKING:
    from apigate.engine.upstream import PoolManager
    from apigate.policies.services import PolicyServices, ServiceName

_LOOPBACK: Final = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_SECRET_KEY: Final = re.compile(r"secret|token|password|passwd|api[_-]?key|private|credential", re.IGNORECASE)


def _shorthand(key: str, value: str) -> tuple[str | None, dict[str, Any] | None, str]:
    """The policy a route's ``key: value`` stands for, its config (None: it cannot be honoured)
    and, when there is none, why (for the log).

    Each policy declares the key it takes (``Policy.shorthand``); ``auth:`` may also name a
    policy itself (``auth: jwt``). A key no policy takes names none.
    """
    for policy in shorthand_policies(key):
        try:
            config = policy.expand_shorthand(value)
        except ValueError as exc:
            return (policy.name, None, str(exc))  # e.g. a secret is unset: not active (fails closed)
        if config is not None:
            return (policy.name, config, "")
    if key == "auth":
        return (value.replace("_", "-"), {}, "")
    return (None, None, "no policy takes it in this version")


def _compile_rewrite(template: str | None) -> tuple[tuple[bool, str], ...] | None:
    return None if template is None else path_template(template)


def target_key(upstream: str, url: str) -> str:
    """The name a target's kept state goes by: its upstream and its normalised address. The node's
    active checks report under the same key."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    shown_host = f"[{host}]" if ":" in host else host
    return f"{upstream}/{parts.scheme}://{shown_host}:{port}"


def _make_target(
    upstream_name: str, url: str, weight: int, pool_config: Any, pools: PoolManager, states: TargetStates
) -> Target:
    parts = urlsplit(url)
    scheme = parts.scheme
    host = parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    host_header = host_field(scheme, host, port)
    tls = ssl.create_default_context() if scheme == "https" else None
    pool = pools.pool_for(scheme, host, port, tls, pool_config)
    key = target_key(upstream_name, url)
    target_id = f"{stable_hash(key.encode()):016x}"
    return Target(scheme, host, port, host_header, weight, pool, states.state_for(key), target_id, tls)


def _policy_chain(
    global_raw: dict[str, Any], route: RouteConfig, services: PolicyServices | None
) -> tuple[tuple[Policy[Any], ...], tuple[tuple[str, str], ...]]:
    """Global policies, overridden by the route's own config for the same name; shorthands
    resolved. Also the shorthands that are not active, each with why and what the route does
    meanwhile."""
    raw: dict[str, Any] = dict(global_raw)
    raw.update(route.policies)
    inactive: list[tuple[str, str]] = []
    known = registry()
    for key in ROUTE_SHORTHANDS:
        value = getattr(route, key)
        if value is None:
            continue
        name, cfg, why = _shorthand(key, value)
        if name in raw:
            continue  # the policy is configured by name: the shorthand adds nothing
        if name is not None and cfg is not None:
            if name in known and not validate_policy_config(name, cfg, ()):
                raw[name] = cfg
                continue
            why = (
                f"the {name} policy needs settings the shorthand cannot give: configure it under policies"
                if name in known
                else f"no policy named {name!r}"
            )
        if key == "auth":  # a route meant to be authenticated is closed, never served open
            raw["request-termination"] = {
                "status": 503,
                "reason": "auth_not_configured",
                "message": f"auth: {value} is not configured on this route",
            }
            why += "; its requests are refused (503) until then"
        else:
            why += "; the route is served without it"
        inactive.append((f"{key}: {value}", why))
    policies = sorted(
        (build_policy(name, cfg, services, route.display_name) for name, cfg in raw.items()),
        key=lambda p: (p.order, p.name),
    )
    return tuple(policies), tuple(inactive)


def route_policies(config: GatewayConfig) -> dict[str, tuple[Policy[Any], ...]]:
    """Each route's policy chain as ``compile_plan`` builds it (no services), by route name: for
    tools that read what the policies would count (`apigate limits`)."""
    return {
        route.display_name: _policy_chain(config.policies, route, None)[0]
        for route in [*config.routes, *source_routes(config)]
    }


def _hooks(policies: Sequence[Policy[Any]], phase: Phase) -> tuple[Callable[..., Any], ...]:
    """The hooks of the policies that use ``phase``, in chain order; the others cost nothing."""
    return tuple(p.hook(phase) for p in policies if phase in p.phases)


def _route_methods(listed: Sequence[str] | None, policies: Sequence[Policy[Any]]) -> frozenset[str] | None:
    """The methods the router matches for a route: those listed, and OPTIONS where a policy
    answers CORS preflights (a browser asks before a request it may not send unasked, whatever
    methods the route lists); that policy answers other OPTIONS requests 405 itself."""
    if not listed:
        return None
    methods = frozenset(listed)
    answering = [p for p in policies if p.answers_preflights and "request" in p.phases]
    if "OPTIONS" in methods or not answering:
        return methods
    for policy in answering:
        policy.only_preflights(", ".join(sorted(methods)).encode())  # (as the router's 405 says)
    return methods | {"OPTIONS"}


def compile_plan(
    config: GatewayConfig,
    pools: PoolManager,
    services: PolicyServices | None = None,
    states: TargetStates | None = None,
    discovered: Mapping[str, Sequence[tuple[str, int]]] | None = None,
    finish_hooks: Sequence[LogHook] = (),
    meters: Meters | None = None,
    sampled_hooks: Sequence[LogHook] = (),
) -> Plan:
    """The Plan for ``config``: upstream targets get their pools from ``pools`` and their health
    and circuits from ``states`` (both kept across reloads), policies get ``services``. An upstream
    whose targets come from a service or DNS takes them, as (url, weight), from ``discovered``
    (none known yet: no target, and its requests are answered 503). ``finish_hooks`` see every
    finished exchange, ``sampled_hooks`` those whose trace is sampled (the process's observers).
    Routes and targets count into ``meters`` (kept across reloads) unless ``metrics.enabled`` is
    off."""
    states = states if states is not None else TargetStates()
    groups: dict[str, UpstreamGroup] = {}
    for name, upstream in config.upstreams.items():
        if upstream.discovered:
            found = (discovered or {}).get(name, ())
            upstream = upstream.model_copy(
                update={"targets": [TargetConfig(url=u, weight=w) for u, w in found]}
            )
        groups[name] = _group(name, upstream, config, pools, states)

    compiled: list[CompiledRoute] = []
    target_groups: list[UpstreamGroup] = []  # the groups of routes that name one target
    entries: list[RouteEntry] = []
    inactive: dict[str, tuple[tuple[str, str], ...]] = {}
    for order, route in enumerate([*config.routes, *source_routes(config)]):
        group: UpstreamGroup | None = None
        if route.upstream is not None:
            group = groups[route.upstream]
        elif route.target is not None:
            single = UpstreamConfig(targets=[TargetConfig(url=route.target)])
            group = _group(route.display_name, single, config, pools, states)
            target_groups.append(group)
        policies, route_inactive = _policy_chain(config.policies, route, services)
        shorthands = tuple(shorthand for shorthand, _ in route_inactive)
        body_policies = [p for p in policies if "body" in p.phases]
        max_body = route.max_body_size if route.max_body_size is not None else config.limits.max_body_size
        body_limit = max((p.body_limit for p in body_policies), default=0)
        if max_body is not None:
            body_limit = min(body_limit, max_body)
        item = CompiledRoute(
            name=route.display_name,
            path=route.path,
            upstream=group,
            prefix_strip=route.strip_prefix,
            rewrite=_compile_rewrite(route.rewrite),
            preserve_host=route.preserve_host,
            timeout=route.timeout,
            retry=route.retries.policy(),
            max_body_size=max_body,
            lists_methods=route.methods is not None,
            policies=policies,
            request_hooks=_hooks(policies, "request"),
            response_hooks=tuple(reversed(_hooks(policies, "response"))),
            log_hooks=_hooks(policies, "log"),
            body_hooks=_hooks(body_policies, "body"),
            body_limit=body_limit,
            response_body_hooks=tuple(reversed(_hooks(policies, "response_body"))),
            oversized_body_streams=bool(body_policies)
            and all(p.oversized_body == "stream" for p in body_policies),
            inactive=shorthands,
            upgrades=frozenset(p.encode() for p in route.upgrades),
            response_replaces=any(p.replaces_responses and "response" in p.phases for p in policies),
            description=_describe(route, policies, shorthands),
        )
        if route_inactive:
            inactive[item.name] = route_inactive
        compiled.append(item)
        entries.append(
            RouteEntry(
                path=route.path,
                payload=item,
                hosts=tuple(route.host or ()),
                methods=_route_methods(route.methods, policies),
                headers=tuple(
                    (name.encode(), None if value == "*" else value.encode())
                    for name, value in (route.headers or {}).items()
                ),
                order=order,
            )
        )
    states.retain(
        {t.state.key for g in (*groups.values(), *target_groups) for t in g.targets},
        {g.name for g in (*groups.values(), *target_groups)},
    )
    all_groups = (*groups.values(), *target_groups)
    unrouted = _meter(config, meters, compiled, all_groups)
    timeouts = config.timeouts
    return Plan(
        router=Router(entries),
        routes=tuple(compiled),
        trusted_proxies=tuple(config.trusted_proxies),
        timeouts=Timeouts(
            connect=timeouts.connect,
            read=timeouts.read,
            keepalive=timeouts.keepalive,
            header=timeouts.header,
            body_idle=timeouts.body_idle,
            drain=timeouts.drain,
            drain_notice=timeouts.drain_notice,
        ),
        endpoints=_endpoints(config),
        max_header_bytes=config.limits.max_header_bytes,
        unescape_slashes=config.paths.escaped_slashes == "unescape",
        inactive=inactive,
        upstreams=all_groups,
        finish_hooks=tuple(finish_hooks),
        sampled_hooks=tuple(sampled_hooks),
        unrouted=unrouted,
        trace_sample_ratio=config.tracing.sample_ratio,
    )


def _meter(
    config: GatewayConfig,
    meters: Meters | None,
    routes: list[CompiledRoute],
    groups: tuple[UpstreamGroup, ...],
) -> RouteMeter | None:
    """Give routes and targets their meters; the meter of requests no route matched."""
    if meters is None or not config.metrics.enabled:
        return None
    for route in routes:
        route.meter = meters.route(route.name)
    for group in groups:
        for target in group.targets:
            target.meter = meters.target(group.name, target.address)
    meters.retain({route.name for route in routes}, {(g.name, t.address) for g in groups for t in g.targets})
    meters.consumer_limit = config.metrics.consumers
    return meters.unrouted


def needs_of(plan: Plan) -> frozenset[ServiceName]:
    """The shared services the plan's policies use (the process starts them before serving)."""
    return frozenset().union(*(policy.needs for route in plan.routes for policy in route.policies))


def state_urls_of(plan: Plan) -> frozenset[str]:
    """The state backends of their own that the plan's policies name (opened with the services)."""
    return frozenset().union(*(policy.state_urls for route in plan.routes for policy in route.policies))


def _endpoints(config: GatewayConfig) -> Endpoints:
    """The built-in endpoints. Who may read /routes and /stats: ``endpoints.allow`` if set;
    otherwise a token alone guards them, and without one loopback and the trusted proxies do."""
    endpoints = config.endpoints
    token = endpoints.token.get_secret_value().encode() if endpoints.token is not None else None
    allow: tuple[Network, ...] | None
    if endpoints.allow is not None:
        allow = tuple(endpoints.allow)
    else:
        allow = None if token is not None else (*_LOOPBACK, *config.trusted_proxies)
    return Endpoints(
        health=endpoints.health,
        health_detailed=endpoints.health_detailed,
        routes=endpoints.routes,
        stats=endpoints.stats,
        metrics=endpoints.metrics,
        metrics_prometheus=endpoints.metrics_prometheus,
        token=token,
        allow=allow,
    )


def _describe(
    route: RouteConfig, policies: tuple[Policy[Any], ...], inactive: tuple[str, ...]
) -> dict[str, Any]:
    """What /routes shows of a route: its config and its policies' configs, secrets masked."""
    item: dict[str, Any] = mask_secrets(route.model_dump(mode="json", exclude_none=True))
    item["name"] = route.display_name
    item["policies"] = {p.name: mask_secrets(p.describe()) for p in policies}
    if inactive:
        item["inactive"] = list(inactive)
    return item


def mask_secrets(value: Any) -> Any:
    """A copy of a config value with every secret-looking field replaced by '***'."""
    if isinstance(value, dict):
        return {k: ("***" if _SECRET_KEY.search(str(k)) and v else mask_secrets(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def _group(
    name: str, upstream: UpstreamConfig, config: GatewayConfig, pools: PoolManager, states: TargetStates
) -> UpstreamGroup:
    """An upstream's targets (their kept states given this config's settings) and its balancer."""
    targets = [_make_target(name, t.url, t.weight, upstream.pool, pools, states) for t in upstream.targets]
    circuit = upstream.circuit_breaker
    per_target = circuit is not None and circuit.scope in ("target", "both")
    for target in targets:
        state = target.state
        if per_target:
            assert circuit is not None
            states.target_breaker(state, circuit.settings(), circuit.share)
        else:
            state.breaker = None
        if upstream.health.active is None:
            state.healthy = True  # no checks: nothing may hold it out
            state.health_detail = None
        if upstream.health.passive is None:
            state.ejected_until = 0.0
        state.update_blocked()
    live = [t for t in targets if t.weight > 0] or targets
    group_breaker = None
    if circuit is not None and circuit.scope in ("upstream", "both"):
        group_breaker = states.upstream_breaker(name, circuit.settings())
    budget = upstream.retry_budget
    timeouts = upstream.timeouts
    passive = upstream.health.passive
    return UpstreamGroup(
        name,
        targets,
        balancer=upstream.balancer.build(live),
        timeouts=UpstreamTimeouts(
            connect=timeouts.connect or config.timeouts.connect,
            first_byte=timeouts.first_byte or config.timeouts.read,
            idle=timeouts.idle or config.timeouts.read,
        ),
        breaker=group_breaker,
        ejection=passive.settings() if passive is not None else None,
        budget=states.retry_budget(name, budget.ratio, budget.window, budget.min_per_second)
        if budget
        else None,
        failure_statuses=frozenset(upstream.failure_statuses),
        monitored=per_target or passive is not None or upstream.balancer.name == "p2c",
    )
