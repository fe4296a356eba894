"""What the bearer-token policies (jwt, oauth2-introspection) share: how a valid token's claims
are handed on, how their cache of what tokens grant stays bounded, and how a request without a
valid token is refused.

A valid token's claims go to later policies in ``exchange.vars()`` (``claims``, and the
``scopes`` and ``roles`` sets that `authorize` checks) and, for the claims a route names in
``forward_claims``, to the upstream as headers.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from apigate.config.headernames import check_header_name
from apigate.engine.replies import Reply, json_reply

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

# Besides the headers the proxy owns, a token or a claim never travels in Cookie as a whole header.
NOT_FOR_TOKENS = frozenset({"cookie"})
_UNSAFE_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

Grant = TypeVar("Grant")


def claim_names(value: Any) -> frozenset[str]:
    """A space-separated string or a list of strings, as a set."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list | tuple):
        return frozenset(item for item in value if isinstance(item, str))
    return frozenset()


def claim_text(value: Any) -> str | None:
    """A claim as text: scalars as themselves, a list of scalars comma-joined, anything else JSON."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return ",".join(claim_text(v) or "" for v in value)
    return orjson.dumps(value).decode()


def claim_header_value(value: Any) -> bytes | None:
    """A claim as a header value, or None if it has none or would need control characters."""
    text = claim_text(value)
    if text is None:
        return None
    data = text.encode()
    return None if _UNSAFE_VALUE.search(data) else data


def claim_vars(claims: dict[str, Any]) -> dict[str, Any]:
    """What later policies read from ``exchange.vars()``: the claims, scopes (``scope`` and
    ``scp``) and roles."""
    return {
        "claims": MappingProxyType(claims),
        "scopes": claim_names(claims.get("scope")) | claim_names(claims.get("scp")),
        "roles": claim_names(claims.get("roles")),
    }


def check_forward_claims(pairs: dict[str, str]) -> dict[str, str]:
    """Validate ``forward_claims`` (claim -> upstream header): usable, distinct header names."""
    for header in pairs.values():
        check_header_name(header, "carry a claim", NOT_FOR_TOKENS)
    lowered = [h.lower() for h in pairs.values()]
    if len(set(lowered)) != len(lowered):
        raise ValueError("two claims are forwarded in the same header")
    return pairs


def remember_token(cache: dict[bytes, Grant], token: bytes, grant: Grant, size: int) -> None:
    """Cache what a token grants; a full cache first drops its oldest entry (dicts keep insertion
    order)."""
    if len(cache) >= size:
        del cache[next(iter(cache))]
    cache[token] = grant


class ClaimForwarding:
    """A route's ``forward_claims`` (and ``strip_credential``): the upstream headers a valid token's
    claims travel in, and the client-sent headers removed first, so that only the gateway sets them."""

    __slots__ = ("drop", "headers", "pairs")

    def __init__(
        self, forward_claims: dict[str, str], credential_header: bytes, strip_credential: bool
    ) -> None:
        self.pairs = [(claim, header.lower().encode()) for claim, header in forward_claims.items()]
        self.headers = frozenset(header for _, header in self.pairs)
        self.drop = self.headers | {credential_header} if strip_credential else self.headers

    def header_values(self, claims: dict[str, Any]) -> list[tuple[bytes, bytes]]:
        """The (header, value) pairs of the forwarded claims that have a usable value."""
        forward = []
        for claim, header in self.pairs:
            value = claim_header_value(claims.get(claim))
            if value is not None:
                forward.append((header, value))
        return forward

    def drop_client_claims(self, exchange: Exchange) -> None:
        """For a request without a token: claim headers a client sent must not reach the upstream."""
        if self.headers:
            exchange.headers = [pair for pair in exchange.headers if pair[0] not in self.headers]

    def admit(self, exchange: Exchange, vars: dict[str, Any], forward: list[tuple[bytes, bytes]]) -> None:
        """Hand a valid token's grants on: ``vars`` to later policies, ``forward`` to the upstream."""
        state = exchange.state
        if state is None:
            exchange.state = vars.copy()
        else:
            state.update(vars)
        if self.drop:
            headers = [pair for pair in exchange.headers if pair[0] not in self.drop]
            headers += forward
            exchange.headers = headers


# Refusals every bearer-token policy gives alike: reason -> (status, message).
BEARER_REASONS: dict[str, tuple[int, str]] = {
    "missing_token": (401, "a bearer token is required"),
    "invalid_token": (401, "the bearer token is not valid"),
    "token_expired": (401, "the bearer token has expired"),
    "token_too_large": (401, "the bearer token is too large"),
}


class BearerRefusals:
    """A bearer-token policy's refusals: a 401 carries a ``Bearer`` challenge (with
    ``error="invalid_token"`` unless the token is missing, RFC 6750 §3), a 503 a ``Retry-After``."""

    __slots__ = ("_invalid", "_missing", "_reasons", "challenge")

    def __init__(self, realm: str, reasons: dict[str, tuple[int, str]]) -> None:
        """``reasons``: reason code -> (status, message)."""
        self.challenge = f'Bearer realm="{realm}"'.encode()
        self._missing = [(b"www-authenticate", self.challenge)]
        self._invalid = [(b"www-authenticate", f'Bearer realm="{realm}", error="invalid_token"'.encode())]
        self._reasons = reasons

    def reply(self, exchange: Exchange, reason: str) -> Reply:
        status, message = self._reasons[reason]
        if status == 503:
            headers = [(b"retry-after", b"5")]
        elif reason == "missing_token":
            headers = self._missing
        else:
            headers = self._invalid
        payload = {"error": message, "reason": reason, "request_id": exchange.request_id}
        return json_reply(status, payload, headers)
