"""Token claims as the token policies (jwt, oauth2-introspection) hand them on.

A valid token's claims go to later policies in ``exchange.vars()`` (``claims``, and the
``scopes`` and ``roles`` sets that `authorize` checks) and, for the claims a route names in
``forward_claims``, to the upstream as headers.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Any

import orjson

from apigate.config.headernames import check_header_name

# Besides the headers the proxy owns, a token or a claim never travels in Cookie as a whole header.
NOT_FOR_TOKENS = frozenset({"cookie"})
_UNSAFE_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


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
