"""When a stale stored response may still be served (RFC 9111 §4.2.4, §5.2; RFC 5861), as plain
functions of Cache-Control directives, and the refreshes running in the background.

A cache must not serve a stale response unless the client, the origin or the cache's
configuration allows it, and never when the response says ``must-revalidate`` or
``proxy-revalidate``. ``s-maxage`` brings proxy-revalidate's rule to a shared cache (§5.2.2.10):
then only the response's own ``stale-while-revalidate`` or ``stale-if-error`` (RFC 5861, which
lets the response be used "regardless of other freshness information") allows it, never the
client's ``max-stale`` or ``stale-if-error`` nor the route's defaults.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Final

from apigate.policies.cache.freshness import Headers, delta_seconds, first

Directives = dict[bytes, bytes | None]

WHILE_REVALIDATE: Final = b"stale-while-revalidate"
IF_ERROR: Final = b"stale-if-error"
# Upstream statuses that count as an error for stale-if-error (RFC 5861 §4).
ERROR_STATUSES: Final = frozenset({500, 502, 503, 504})
# Request fields a refresh does not carry: the client's own conditions and range (the gateway
# sends its validators of the stored response instead).
CLIENT_CONDITIONS: Final = frozenset(
    {b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range", b"range"}
)


def validators(stored: Headers) -> Headers:
    """The request fields that revalidate a stored response (RFC 9111 §4.3.1): If-None-Match with
    its ETag, If-Modified-Since with its Last-Modified (none: it cannot be revalidated)."""
    found: Headers = []
    etag = first(stored, b"etag")
    if etag is not None:
        found.append((b"if-none-match", etag))
    last_modified = first(stored, b"last-modified")
    if last_modified is not None:
        found.append((b"if-modified-since", last_modified))
    return found


def must_revalidate(response: Directives) -> bool:
    """The response forbids being served stale by any cache (§5.2.2.2) or a shared one (§5.2.2.8)."""
    return b"must-revalidate" in response or b"proxy-revalidate" in response


def stale_window(
    name: bytes, response: Directives, request: Directives, default: float | None
) -> float | None:
    """Seconds past its freshness that the stored response may be served under ``name``
    (stale-while-revalidate or stale-if-error): the request's own directive (stale-if-error
    only: RFC 5861 §4 lets a client state it), else the response's, else ``default`` (the
    route's); None when nothing allows it. A malformed value allows nothing."""
    if must_revalidate(response):
        return None
    strict = b"s-maxage" in response
    if not strict and name in request:
        return _seconds(request[name])
    if name in response:
        return _seconds(response[name])
    return None if strict else default


def max_stale(request: Directives, response: Directives) -> float | None:
    """How stale a response the client accepts (its max-stale, §5.2.1.2: without a value, any);
    None when it says nothing or the response may not be served stale on its word."""
    if b"max-stale" not in request or must_revalidate(response) or b"s-maxage" in response:
        return None
    argument = request[b"max-stale"]
    if argument is None:
        return float("inf")
    return _seconds(argument)


def _seconds(argument: bytes | None) -> float | None:
    found = delta_seconds(argument)
    return float(found) if found is not None else None


class Refreshes:
    """The stored responses being refreshed in the background: one refresh at most for each, so
    concurrent requests served stale start no more."""

    def __init__(self) -> None:
        self.running: set[Hashable] = set()

    def start(self, key: Hashable) -> bool:
        """True when no refresh of ``key`` runs (this caller now owns one, and must ``end`` it)."""
        if key in self.running:
            return False
        self.running.add(key)
        return True

    def end(self, key: Hashable) -> None:
        self.running.discard(key)


REFRESHES: Final = Refreshes()
"""This process's refreshes (the store is one per process too)."""
