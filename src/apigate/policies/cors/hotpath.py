"""The `cors` policy's per-request work, kept free of pydantic so that mypyc can compile it.

Every request of the route meets the request hook, which only looks further at an ``OPTIONS``
(a preflight is handed to the policy, which makes the answer), and every response meets the
response hook: it reads the request's ``Origin``, drops the upstream's own CORS fields, adds
``Origin`` to ``Vary`` where the answer depends on it, and adds the allow fields for an allowed
origin. Origins are judged once each: exact ones by a set, the others (wildcards, patterns) by
the policy's regular expressions, their verdicts kept in a bounded dict.
"""

from __future__ import annotations

from collections.abc import Callable
from re import Pattern
from typing import Any, Final

from apigate.engine.exchange import Exchange

ALLOW_ORIGIN: Final = b"access-control-allow-origin"
_CORS_PREFIX: Final = b"access-control-"
_REQUEST_METHOD: Final = b"access-control-request-method"
_VARY: Final = b"vary"
# No serialized origin is this long (a host name is at most 253 bytes): longer ones are refused
# unread, so no pattern ever runs over a long value.
LONGEST_ORIGIN: Final = 512
# Verdicts kept for origins judged by a pattern; when full, the dict starts again.
VERDICTS_KEPT: Final = 4096


class OriginMatcher:
    """Whether an ``Origin`` value is allowed: an exact origin, or one a pattern matches whole."""

    def __init__(self, exact: frozenset[bytes], patterns: list[Pattern[str]]) -> None:
        self.exact = exact
        self.patterns = patterns
        self.verdicts: dict[bytes, bool] = {}

    def allows(self, origin: bytes) -> bool:
        if origin in self.exact:
            return True
        if not self.patterns or len(origin) > LONGEST_ORIGIN:
            return False
        verdict = self.verdicts.get(origin)
        if verdict is None:
            text = origin.decode("latin-1")
            verdict = False
            for pattern in self.patterns:
                if pattern.fullmatch(text) is not None:
                    verdict = True
                    break
            if len(self.verdicts) >= VERDICTS_KEPT:
                self.verdicts.clear()
            self.verdicts[origin] = verdict
        return verdict


def lists_token(value: bytes, token: bytes) -> bool:
    """``value`` (a comma-separated field such as Vary) lists ``token`` (lowercase) or ``*``."""
    for item in value.split(b","):
        item = item.strip().lower()
        if item == token or item == b"*":
            return True
    return False


def read_request(exchange: Exchange) -> tuple[bytes | None, bool]:
    """The request's first ``Origin`` (None without one), and whether it asks as a preflight does:
    an ``OPTIONS`` with a non-empty ``Access-Control-Request-Method``."""
    origin: bytes | None = None
    preflight = False
    options = exchange.method == "OPTIONS"
    for name, value in exchange.headers:
        if name == b"origin":
            if origin is None:
                origin = value
        elif options and name == _REQUEST_METHOD and value:
            preflight = True
    return origin, preflight


class CorsCheck:
    """The route's CORS answers: ``preflight`` (the policy's) answers a preflight; the response
    hook adds ``fields`` (credentials, exposed headers) after ``Access-Control-Allow-Origin``
    for an allowed origin. ``any_origin``: every origin is allowed with ``*``, and the answer does
    not depend on the origin (no ``Vary: Origin``)."""

    def __init__(
        self,
        matcher: OriginMatcher,
        any_origin: bool,
        fields: list[tuple[bytes, bytes]],
        preflight: Callable[[Exchange, bytes], Any],
    ) -> None:
        self.matcher = matcher
        self.any_origin = any_origin
        self.fields = fields
        self.preflight = preflight
        # Set where the route lists methods without OPTIONS (the router admits OPTIONS for the
        # preflights): the answer to any other OPTIONS request, a 405.
        self.plain_options: Callable[[Exchange], Any] | None = None

    def on_request(self, exchange: Exchange) -> Any:
        if exchange.method != "OPTIONS":
            return None
        origin, preflight = read_request(exchange)
        if origin is None or not preflight:
            plain_options = self.plain_options
            # A plain OPTIONS request: the upstream answers it, where the route lists OPTIONS.
            return None if plain_options is None else plain_options(exchange)
        return self.preflight(exchange, origin)

    def on_response(self, exchange: Exchange) -> None:
        origin, preflight = read_request(exchange)
        if preflight and origin is not None:
            return  # answered by the policy (or, with preflight_continue, by the upstream) as it is
        allowed: bytes | None = None
        if self.any_origin:
            allowed = b"*"
        elif origin is not None and self.matcher.allows(origin):
            allowed = origin
        headers = exchange.response_headers
        vary = not self.any_origin
        for pair in headers:
            name = pair[0]
            if name == _VARY or name.startswith(_CORS_PREFIX):
                headers = self._replace_own_fields(headers, vary)
                exchange.response_headers = headers
                vary = False  # merged into the upstream's Vary
                break
        if vary:
            headers.append((_VARY, b"Origin"))
        if allowed is not None:
            headers.append((ALLOW_ORIGIN, allowed))
            if self.fields:
                headers += self.fields

    def _replace_own_fields(
        self, headers: list[tuple[bytes, bytes]], vary: bool
    ) -> list[tuple[bytes, bytes]]:
        """``headers`` without the upstream's CORS fields, and (``vary``) with ``Origin`` in its Vary."""
        kept: list[tuple[bytes, bytes]] = []
        first_vary = -1
        listed = not vary
        for pair in headers:
            name = pair[0]
            if name.startswith(_CORS_PREFIX):
                continue
            if name == _VARY and not listed:
                if lists_token(pair[1], b"origin"):
                    listed = True
                elif first_vary < 0:
                    first_vary = len(kept)
            kept.append(pair)
        if not listed:
            if first_vary >= 0:
                name, value = kept[first_vary]
                kept[first_vary] = (name, value + b", Origin" if value.strip() else b"Origin")
            else:
                kept.append((_VARY, b"Origin"))
        return kept
