"""The `jwt` policy's cached-token path, kept free of pydantic so that mypyc can compile it.

A repeated token costs a header scan, one dict probe, one comparison and one clock read;
everything else (parsing, verifying, revocation checks, cookies and query parameters) stays in
the policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from apigate.engine.exchange import Exchange

_now = time.time  # tokens carry wall-clock times; tests set the clock here

# The cache is keyed by a credential's last bytes (a JWT's signature), because hashing a whole
# token on every request cost more than the rest of a hit for RS256 tokens; each entry keeps
# the whole credential, compared on every hit.
KEY_BYTES: Final = 32


def cache_key_of(credential: bytes) -> bytes:
    return credential[-KEY_BYTES:]


def cached(cache: dict[bytes, Entry], credential: bytes) -> Entry | None:
    """The entry remembered for exactly this credential, expired or not."""
    entry = cache.get(cache_key_of(credential))
    if entry is None or entry.credential != credential:
        return None
    return entry


class Entry:
    """What a verified token grants, precomputed so that a cache hit only copies references."""

    def __init__(
        self,
        expires: float,
        consumer: Any,
        tenant: str | None,
        vars: dict[str, Any],
        forward: list[tuple[bytes, bytes]],
        jti: str | None,
    ) -> None:
        self.expires = expires
        self.jti = jti  # set only when the policy checks runtime revocations
        self.consumer = consumer
        self.tenant = tenant
        self.vars = vars
        self.forward = forward
        self.credential = b""  # the header value or token it was remembered for


class CachedTokens:
    """The request hook: a cached, unexpired token in the header is admitted here; anything else
        goes to ``miss`` (the policy's full path), a token to check for revocation to ``admit``, and
    two credentials to ``refuse``."""

    def __init__(
        self,
        header: bytes,
        cache: dict[bytes, Entry],
        drop: frozenset[bytes],
        miss: Callable[[Exchange, bytes | None], Any],
        admit: Callable[[Exchange, Entry], Any],
        refuse: Callable[[Exchange, str], Any],
    ) -> None:
        self.header = header
        self.cache = cache
        self.drop = drop  # the forwarded claims' headers (and the credential's, if stripped)
        self.miss = miss
        self.admit = admit
        self.refuse = refuse

    def check(self, exchange: Exchange) -> Any:
        name = self.header
        value: bytes | None = None
        for pair in exchange.headers:
            if pair[0] == name:
                if value is not None:
                    # Two credentials: the upstream might read the one that was not checked.
                    return self.refuse(exchange, "invalid_token")
                value = pair[1]
        if value is None:
            return self.miss(exchange, None)
        entry = cached(self.cache, value)
        if entry is None or entry.expires <= _now():
            return self.miss(exchange, value)
        if entry.jti is not None:
            return self.admit(exchange, entry)
        exchange.consumer = entry.consumer
        exchange.tenant = entry.tenant
        state = exchange.state
        if state is None:
            exchange.state = entry.vars.copy()
        else:
            state.update(entry.vars)
        drop = self.drop
        if drop:
            headers = [pair for pair in exchange.headers if pair[0] not in drop]
            headers += entry.forward
            exchange.headers = headers
        return None
