"""Policies registered by name. Adding a policy means adding a module and one line to BUILTIN."""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

from pydantic import ValidationError

from apigate.config.issues import ConfigIssue
from apigate.policies.base import Policy, phase_mismatch
from apigate.policies.services import NO_SERVICES, PolicyServices

# Modules that define the built-in policies; each registers itself on import.
BUILTIN = (
    "apigate.policies.headers",
    "apigate.policies.cors",
    "apigate.policies.security_headers",
    "apigate.policies.transform",
    "apigate.policies.key_auth",
    "apigate.policies.hmac_auth",
    "apigate.policies.basic_auth",
    "apigate.policies.jwt",
    "apigate.policies.oauth2_introspection",
    "apigate.policies.oauth2_token",
    "apigate.policies.authorize",
    "apigate.policies.rate_limit",
    "apigate.policies.spike_arrest",
    "apigate.policies.quota",
    "apigate.policies.concurrency_limit",
    "apigate.policies.request_termination",
    "apigate.policies.webhook_verify",
    "apigate.policies.webhook_ingest",
    "apigate.policies.compression",
    "apigate.policies.cache",
)

PolicyClass = TypeVar("PolicyClass", bound=type[Policy[Any]])

_registry: dict[str, type[Policy[Any]]] = {}


def register(cls: PolicyClass) -> PolicyClass:
    """Add a policy class under its name; a name taken twice, or phases that disagree with the
    class's hooks, are refused here (a plugin's then fail its import, a config error)."""
    if cls.name in _registry and _registry[cls.name] is not cls:
        raise ValueError(f"policy name {cls.name!r} is registered twice")
    mismatch = phase_mismatch(cls)
    if mismatch is not None:
        raise TypeError(f"policy {cls.name!r} {mismatch}")
    _registry[cls.name] = cls
    return cls


_builtins_loaded = False


def registry() -> dict[str, type[Policy[Any]]]:
    # A flag, not "is it empty": importing one policy module on its own registers that policy
    # alone, and the other built-ins must still load.
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN:
            importlib.import_module(module)
    return _registry


def shorthand_policies(key: str) -> list[type[Policy[Any]]]:
    """The policies that declare the route key ``key`` (``auth``, ``rate_limit``...) as their shorthand."""
    return [cls for _, cls in sorted(registry().items()) if cls.shorthand == key]


def load_plugins(modules: list[Any]) -> list[ConfigIssue]:
    """Import modules that register policies of their own (``plugins:`` in the config)."""
    issues: list[ConfigIssue] = []
    registry()  # built-ins first, so a plugin that reuses a built-in name is refused
    for index, module in enumerate(modules):
        if not isinstance(module, str):
            continue  # field validation reports the type
        try:
            importlib.import_module(module)
        except Exception as exc:  # any import failure is a config error, never a crash
            issues.append(ConfigIssue(loc=("plugins", index), message=f"cannot import {module!r}: {exc}"))
    return issues


def validate_policy_config(
    name: str, raw: dict[str, Any] | None, loc: tuple[str | int, ...]
) -> list[ConfigIssue]:
    cls = registry().get(name)
    if cls is None:
        known = ", ".join(sorted(registry())) or "none"
        return [ConfigIssue(loc=loc, message=f"unknown policy {name!r} (available: {known})")]
    try:
        cls.Config.model_validate(raw or {})
    except ValidationError as exc:
        # A bad mapping key is reported at the key itself (pydantic adds a "[key]" part after it).
        return [
            ConfigIssue(loc=(*loc, *(part for part in err["loc"] if part != "[key]")), message=err["msg"])
            for err in exc.errors(include_input=False, include_url=False)
        ]
    return []


def build_policy(
    name: str, raw: dict[str, Any] | None, services: PolicyServices | None = None, route: str = ""
) -> Policy[Any]:
    """The policy ``name`` with config ``raw`` (validated) for the route named ``route``, reaching
    ``services`` (none running: None)."""
    cls = registry()[name]
    policy = cls(cls.Config.model_validate(raw or {}), NO_SERVICES if services is None else services, route)
    if not policy.phases <= cls.phases:
        raise TypeError(f"policy {name!r} may narrow its phases for a config, not add to them")
    return policy
