"""HTTP caching rules (RFC 9111) as plain functions of headers and explicit times.

Nothing here reads a clock: every time is passed in (seconds since the epoch), so the rules are
tested with exact instants and the policy decides with its store's clock.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from typing import Final

Headers = list[tuple[bytes, bytes]]

# Statuses a cache may store without explicit freshness (RFC 9110 §15.1); 206 is left out, since
# ranges are not stored.
CACHEABLE_BY_DEFAULT: Final = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# Heuristic freshness: this fraction of the time since Last-Modified (RFC 9111 §4.2.2), capped.
HEURISTIC_FRACTION: Final = 0.1
# Delta-seconds past this are taken as this (RFC 9111 §1.2.2: 2^31).
DELTA_MAX: Final = 2**31


def cache_control(headers: Headers) -> dict[bytes, bytes | None]:
    """The Cache-Control directives of ``headers`` (every field joined): lowercase names to their
    argument (quotes removed) or None. The first occurrence of a directive counts."""
    directives: dict[bytes, bytes | None] = {}
    for name, value in headers:
        if name != b"cache-control":
            continue
        for item in _split_list(value):
            directive, equals, argument = item.partition(b"=")
            key = directive.strip().lower()
            if not key or key in directives:
                continue
            if equals:
                argument = argument.strip()
                if len(argument) >= 2 and argument[:1] == b'"' and argument[-1:] == b'"':
                    argument = argument[1:-1]
                directives[key] = argument
            else:
                directives[key] = None
    return directives


def _split_list(value: bytes) -> list[bytes]:
    """A comma-separated field value's members, commas inside quoted strings kept."""
    if b'"' not in value:
        return value.split(b",")
    items: list[bytes] = []
    start = 0
    quoted = False
    for index, byte in enumerate(value):
        if byte == 0x22:  # "
            quoted = not quoted
        elif byte == 0x2C and not quoted:  # ,
            items.append(value[start:index])
            start = index + 1
    items.append(value[start:])
    return items


def delta_seconds(argument: bytes | None) -> int | None:
    """A directive's delta-seconds (RFC 9111 §1.2.2); None when missing or malformed."""
    if argument is None:
        return None
    argument = argument.strip()
    if not argument.isdigit():
        return None
    return min(int(argument), DELTA_MAX)


def http_date(value: bytes | None) -> float | None:
    """An HTTP-date (RFC 9110 §5.6.7) as seconds since the epoch; None when missing or invalid."""
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    try:
        return parsed.timestamp()
    except (OverflowError, ValueError, OSError):
        return None


def format_http_date(when: float) -> bytes:
    return email.utils.formatdate(when, usegmt=True).encode("latin-1")


def first(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def joined(headers: Headers, name: bytes) -> bytes | None:
    """Every ``name`` field's value, joined with commas as one list (None: no such field)."""
    found: bytes | None = None
    for key, value in headers:
        if key == name:
            found = value.strip() if found is None else found + b", " + value.strip()
    return found


def vary_names(headers: Headers) -> tuple[bytes, ...] | None:
    """The request fields the response's Vary names, lowercase and sorted; None for ``Vary: *``."""
    names: set[bytes] = set()
    for key, value in headers:
        if key != b"vary":
            continue
        for token in value.split(b","):
            token = token.strip().lower()
            if token == b"*":
                return None
            if token:
                names.add(token)
    return tuple(sorted(names))


@dataclass(frozen=True, slots=True)
class Lifetime:
    """How long a response is fresh, in seconds, and what said so (``explicit``: the response
    itself; else the route's ttl or the heuristic)."""

    seconds: float
    explicit: bool


def freshness_lifetime(
    status: int,
    directives: dict[bytes, bytes | None],
    headers: Headers,
    ttl: float | None,
    heuristic_max: float,
) -> Lifetime | None:
    """The response's freshness lifetime for a shared cache (RFC 9111 §4.2.1): s-maxage, then
    max-age, then Expires minus Date; without any of them the route's ``ttl`` when the status is
    cacheable by default or the response is public, then the heuristic (10% of the time since
    Last-Modified, at most ``heuristic_max``, §4.2.2). None: nothing gives the response a lifetime.
    A malformed s-maxage or max-age counts as 0 (stale), as does an invalid Expires."""
    if b"s-maxage" in directives:
        return Lifetime(float(delta_seconds(directives[b"s-maxage"]) or 0), True)
    if b"max-age" in directives:
        return Lifetime(float(delta_seconds(directives[b"max-age"]) or 0), True)
    expires_field = first(headers, b"expires")
    if expires_field is not None:
        expires = http_date(expires_field)
        date = http_date(first(headers, b"date"))
        if expires is None or date is None:
            return Lifetime(0.0, True)
        return Lifetime(max(0.0, expires - date), True)
    if status not in CACHEABLE_BY_DEFAULT and b"public" not in directives:
        return None
    if ttl is not None:
        return Lifetime(ttl, False)
    last_modified = http_date(first(headers, b"last-modified"))
    date = http_date(first(headers, b"date"))
    if last_modified is not None and date is not None and date > last_modified:
        return Lifetime(min((date - last_modified) * HEURISTIC_FRACTION, heuristic_max), False)
    return None


def initial_age(headers: Headers, request_time: float, response_time: float) -> float:
    """The response's corrected initial age when it arrived (RFC 9111 §4.2.3): the larger of its
    apparent age (``response_time`` minus Date) and its Age plus the time the request took."""
    date = http_date(first(headers, b"date"))
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    age_value = delta_seconds(first(headers, b"age")) or 0
    corrected_age_value = age_value + max(0.0, response_time - request_time)
    return max(apparent_age, corrected_age_value)


def current_age(corrected_initial_age: float, response_time: float, now: float) -> float:
    """The age of a stored response at ``now`` (RFC 9111 §4.2.3): its initial age plus its time here."""
    return corrected_initial_age + max(0.0, now - response_time)


def storable_status(status: int) -> bool:
    """Statuses this cache stores at all: final, and not partial content."""
    return 200 <= status < 600 and status != 206 and status != 304


def refusal(
    method: str,
    status: int,
    request_directives: dict[bytes, bytes | None],
    directives: dict[bytes, bytes | None],
    headers: Headers,
    authorized: bool,
    store_set_cookie: bool,
) -> bytes | None:
    """Why a shared cache must not store this response (RFC 9111 §3, §3.5), as a short reason
    (``b"private"``...); None when it may (freshness is decided apart)."""
    if method != "GET":
        return b"method"
    if not storable_status(status):
        return b"status"
    if b"no-store" in request_directives or b"no-store" in directives:
        return b"no-store"
    if b"private" in directives:
        return b"private"
    if b"no-cache" in directives:
        return b"no-cache"  # every use must be revalidated: not stored until revalidation is
    if authorized and not (
        b"public" in directives or b"s-maxage" in directives or b"must-revalidate" in directives
    ):
        return b"authorization"
    if not store_set_cookie and first(headers, b"set-cookie") is not None:
        return b"set-cookie"
    if vary_names(headers) is None:
        return b"vary"
    return None


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """Whether If-None-Match names ``etag`` by the weak comparison (RFC 9110 §13.1.2), or is ``*``."""
    if if_none_match.strip() == b"*":
        return True
    opaque = _opaque(etag)
    return any(_opaque(tag) == opaque for tag in _split_list(if_none_match) if tag.strip())


def _opaque(tag: bytes) -> bytes:
    tag = tag.strip()
    return tag[2:] if tag[:2] == b"W/" else tag


def not_modified(request_headers: Headers, stored: Headers) -> bool:
    """Whether a conditional GET/HEAD is answered 304 by the stored response (RFC 9110 §13.2.2):
    If-None-Match against its ETag when sent, else If-Modified-Since against its Last-Modified."""
    if_none_match = joined(request_headers, b"if-none-match")
    if if_none_match is not None:
        etag = first(stored, b"etag")
        return etag is not None and etag_matches(if_none_match, etag)
    since = http_date(first(request_headers, b"if-modified-since"))
    if since is None:
        return False
    last_modified = http_date(first(stored, b"last-modified"))
    return last_modified is not None and last_modified <= since
