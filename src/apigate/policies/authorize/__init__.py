"""The `authorize` policy: who may use a route, once authentication (order 1000) has run.

It reads what the auth policies left on the exchange: ``exchange.consumer`` (a store
``Consumer`` for key-auth, the ``sub`` string for jwt), ``exchange.tenant`` and, in
``exchange.vars()``, ``scopes``, ``roles`` and ``claims``. A request nobody identified gets a
401 with the challenges of the route's auth policies; one that is identified but lacks a right
gets a 403 whose ``reason`` says which kind of check failed, never the credential.

Several auth policies with ``required: false`` on one route plus ``authorize`` make "any one
credential suffices": each lets an absent credential through, and ``authorize`` refuses a
request none of them identified.

Speed: everything is precomputed into frozensets; a request that passes allocates nothing
(``exchange.state`` is read, never created).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from apigate.engine.replies import Reply, json_reply
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.registry import register

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

_METHOD = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_DEFAULT_CHALLENGE = [(b"www-authenticate", b'Bearer realm="apigate"')]
_EMPTY: frozenset[str] = frozenset()

ClaimValue = str | int | float | bool

# reason -> (status, message): generic, nothing about the credential or the missing values.
_REASONS: dict[str, tuple[int, str]] = {
    "unauthenticated": (401, "authentication is required"),
    "insufficient_scope": (403, "the credential lacks a required scope"),
    "insufficient_role": (403, "the credential lacks a required role"),
    "group_not_allowed": (403, "the consumer's groups are not allowed on this route"),
    "tenant_not_allowed": (403, "the consumer's tenant is not allowed on this route"),
    "claim_mismatch": (403, "the credential's claims are not accepted on this route"),
}


def _names(values: list[str], what: str) -> list[str]:
    for value in values:
        if not value or any(c.isspace() for c in value):
            raise ValueError(f"{what} {value!r} must be non-empty and without spaces")
    return values


class AuthorizeConfig(PolicyConfig):
    public: bool = Field(default=False, description="skip every check on this route")
    public_methods: list[str] = Field(default_factory=list, description="methods that skip every check")
    authenticated: bool = Field(default=True, description="401 when no auth policy identified the caller")
    scopes: list[str] = Field(default_factory=list)
    scopes_mode: Literal["all", "any"] = "all"
    roles: list[str] = Field(default_factory=list)
    roles_mode: Literal["any", "all"] = "any"
    groups: list[str] = Field(default_factory=list, description="the consumer must be in one of them")
    tenants: list[str] = Field(default_factory=list, description="the consumer's tenant must be one of them")
    claims: dict[str, ClaimValue | list[ClaimValue]] = Field(
        default_factory=dict, description="claim -> required value, or a list of accepted values"
    )

    @field_validator("public_methods")
    @classmethod
    def _methods(cls, methods: list[str]) -> list[str]:
        for method in methods:
            if not _METHOD.match(method):
                raise ValueError(f"{method!r} is not an HTTP method")
        return [m.upper() for m in methods]

    @field_validator("scopes", "roles", "groups", "tenants")
    @classmethod
    def _listed_names(cls, values: list[str], info: ValidationInfo) -> list[str]:
        return _names(values, (info.field_name or "name").removesuffix("s"))

    @field_validator("claims")
    @classmethod
    def _claims(cls, claims: dict[str, Any]) -> dict[str, Any]:
        for name, accepted in claims.items():
            if not name:
                raise ValueError("a claim name cannot be empty")
            if isinstance(accepted, list) and not accepted:
                raise ValueError(f"claim {name!r} lists no accepted value")
        return claims


def _key(value: Any) -> tuple[bool, Any]:
    """A claim value as compared: ``true`` never equals ``1``."""
    return (value.__class__ is bool, value)


def _groups_of(consumer: Any, state: dict[str, Any] | None) -> Any:
    """A key-auth consumer's groups; for a token, its ``groups`` claim."""
    groups = getattr(consumer, "groups", None)
    if groups is not None:
        return groups
    claims = state.get("claims") if state else None
    value = claims.get("groups") if claims is not None else None
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return ()


@register
class AuthorizePolicy(Policy[AuthorizeConfig]):
    name = "authorize"
    order = 1500
    phases = frozenset({"request"})

    def prepare(self) -> None:
        config = self.config
        self.public = config.public
        self.public_methods = frozenset(config.public_methods)
        self.authenticated = config.authenticated
        self.scopes = frozenset(config.scopes)
        self.scopes_any = config.scopes_mode == "any"
        self.roles = frozenset(config.roles)
        self.roles_all = config.roles_mode == "all"
        self.groups = frozenset(config.groups)
        self.tenants = frozenset(config.tenants)
        self.claims = tuple(
            (name, frozenset(_key(v) for v in (accepted if isinstance(accepted, list) else [accepted])))
            for name, accepted in config.claims.items()
        )
        self.needs_state = bool(self.scopes or self.roles or self.claims)
        self._challenges: list[tuple[bytes, bytes]] | None = None

    def on_request(self, exchange: Exchange) -> Reply | None:
        if self.public or exchange.method in self.public_methods:
            return None
        state = exchange.state
        consumer = exchange.consumer
        if self.authenticated and consumer is None and not (state and "claims" in state):
            # jwt with consumer_claim: null identifies by claims alone
            return self._deny(exchange, "unauthenticated")
        if self.tenants and exchange.tenant not in self.tenants:
            return self._deny(exchange, "tenant_not_allowed")
        if self.groups and self.groups.isdisjoint(_groups_of(consumer, state)):
            return self._deny(exchange, "group_not_allowed")
        if not self.needs_state:
            return None
        if self.scopes:
            held = state.get("scopes", _EMPTY) if state else _EMPTY
            if self.scopes_any:
                if self.scopes.isdisjoint(held):
                    return self._deny(exchange, "insufficient_scope")
            elif not self.scopes <= held:
                return self._deny(exchange, "insufficient_scope")
        if self.roles:
            held = state.get("roles", _EMPTY) if state else _EMPTY
            if self.roles_all:
                if not self.roles <= held:
                    return self._deny(exchange, "insufficient_role")
            elif self.roles.isdisjoint(held):
                return self._deny(exchange, "insufficient_role")
        if self.claims:
            claims = state.get("claims") if state else None
            if claims is None:
                return self._deny(exchange, "claim_mismatch")
            for name, accepted in self.claims:
                if not self._claim_ok(claims.get(name), accepted):
                    return self._deny(exchange, "claim_mismatch")
        return None

    @staticmethod
    def _claim_ok(value: Any, accepted: frozenset[tuple[bool, Any]]) -> bool:
        if isinstance(value, str | int | float):  # bool is an int
            return _key(value) in accepted
        if isinstance(value, list):  # e.g. "amr": ["pwd", "mfa"]: one accepted element suffices
            return any(isinstance(v, str | int | float) and _key(v) in accepted for v in value)
        return False

    # -- answers ----------------------------------------------------------------------------------------
    def _deny(self, exchange: Exchange, reason: str) -> Reply:
        status, message = _REASONS[reason]
        payload = {"error": message, "reason": reason, "request_id": exchange.request_id}
        headers = self._challenge(exchange) if status == 401 else None
        return json_reply(status, payload, headers)

    def _challenge(self, exchange: Exchange) -> list[tuple[bytes, bytes]]:
        """The route's auth policies' challenges, found on the first 401 (a policy serves one route)."""
        challenges = self._challenges
        if challenges is None:
            found = [
                (b"www-authenticate", policy.challenge)
                for policy in getattr(exchange.route, "policies", ())
                if policy.challenge is not None
            ]
            challenges = self._challenges = found or _DEFAULT_CHALLENGE
        return challenges
