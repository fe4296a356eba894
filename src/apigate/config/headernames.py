"""Header names and values in config: what a valid name is, which names the proxy itself owns,
and what a value may not contain."""

from __future__ import annotations

import re

# RFC 9110 §5.6.2 token characters.
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

# Framing and forwarding headers the engine writes itself: a policy may not read credentials
# from them nor set them, since the engine would overwrite or misframe them.
PROXY_OWNED = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "expect",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    }
)


def check_header_name(
    name: str, purpose: str = "be changed by a policy", also: frozenset[str] = frozenset()
) -> str:
    """``name`` if it is a valid header name the proxy does not own; else a ValueError saying why."""
    if not HEADER_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid header name")
    if name.lower() in PROXY_OWNED or name.lower() in also:
        raise ValueError(f"{name!r} is managed by the proxy and cannot {purpose}")
    return name


def check_header_value(value: str) -> str:
    """``value`` if it can be written as one header line (no CR, LF or NUL); else a ValueError."""
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError("header values cannot contain CR, LF or NUL")
    return value
