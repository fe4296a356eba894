"""Checks that span models: upstream references, route names, destinations, policy names and configs.

They work on the raw data, so they run even when field validation failed and a config's problems
are all reported at once. Values of the wrong type are left to field validation. The policy
registry is asked here, never by the models, so ``config.models`` depends on no policy.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from apigate.config.issues import ConfigIssue
from apigate.config.models import ROUTE_SHORTHANDS, RouteConfig, StateConfig
from apigate.policies.registry import registry, shorthand_policies, validate_policy_config


def semantic_issues(data: dict[str, Any]) -> list[ConfigIssue]:
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
        if _lacks_destination(route):
            issues.append(
                ConfigIssue(
                    loc=loc, message="a route needs a target or an upstream (or a policy that answers itself)"
                )
            )
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
        issues.extend(_policy_issues(route.get("policies"), (*loc, "policies")))
        issues.extend(_shorthand_issues(route, loc))
    issues.extend(_policy_issues(data.get("policies"), ("policies",)))
    if not _shared_state(data.get("state")):
        for index, route in enumerate(routes if isinstance(routes, list) else []):
            if isinstance(route, dict):
                issues.extend(_unshared_state_issues(route.get("policies"), ("routes", index, "policies")))
        issues.extend(_unshared_state_issues(data.get("policies"), ("policies",)))
    return issues


def _shared_state(state: Any) -> bool:
    """Whether ``state.url`` names a Redis (a malformed section is reported by field validation)."""
    try:
        return StateConfig.model_validate(state if isinstance(state, dict) else {}).url != "memory://"
    except ValidationError:
        return True


def _unshared_state_issues(policies: Any, loc: tuple[str | int, ...]) -> list[ConfigIssue]:
    """Policy settings that need Redis (``cache: {store: redis}``) while ``state.url`` is memory://."""
    if not isinstance(policies, dict):
        return []
    issues: list[ConfigIssue] = []
    known = registry()
    for name, raw in policies.items():
        cls = known.get(str(name))
        if cls is None or not (raw is None or isinstance(raw, dict)):
            continue
        try:
            field = cls.Config.model_validate(raw or {}).requires_shared_state()
        except ValidationError:
            continue  # reported by _policy_issues
        if field is not None:
            message = "needs a Redis in state.url (it is memory://, which no other process shares)"
            issues.append(ConfigIssue(loc=(*loc, name, field), message=message))
    return issues


def _shorthand_issues(route: dict[Any, Any], loc: tuple[str | int, ...]) -> list[ConfigIssue]:
    """A shorthand value that no policy declaring the key takes (``rate_limit: 100/fortnight``).
    ``auth:`` may name any policy, and an unknown one closes the route instead (see compile)."""
    issues: list[ConfigIssue] = []
    for key in ROUTE_SHORTHANDS:
        value = route.get(key)
        policies = shorthand_policies(key) if key != "auth" and isinstance(value, str) else []
        if not policies:
            continue
        taken = False
        for policy in policies:
            try:
                taken = policy.expand_shorthand(value) is not None
            except ValueError:
                taken = True  # the policy's, though it cannot honour it: reported inactive
            if taken:
                break
        if not taken:
            forms = "; ".join(p.shorthand_forms for p in policies if p.shorthand_forms) or "see the docs"
            issues.append(
                ConfigIssue(loc=(*loc, key), message=f"{value!r} is not understood: expected {forms}")
            )
    return issues


def _lacks_destination(route: dict[Any, Any]) -> bool:
    """No target, no upstream and no policy that answers itself, on a route whose own fields are
    valid (a route with field errors is reported for those alone)."""
    if route.get("target") is not None or route.get("upstream") is not None:
        return False
    known = registry()
    policies = route.get("policies")
    if isinstance(policies, dict) and any(name in known and known[name].terminal for name in policies):
        return False
    try:
        RouteConfig.model_validate(route)
    except ValidationError:
        return False
    return True


def _policy_issues(policies: Any, loc: tuple[str | int, ...]) -> list[ConfigIssue]:
    if not isinstance(policies, dict):
        return []
    issues: list[ConfigIssue] = []
    for name, raw in policies.items():
        if raw is None or isinstance(raw, dict):
            issues.extend(validate_policy_config(str(name), raw, (*loc, name)))
    return issues
