"""The `jwt` policy's cached-token path, kept free of pydantic so that mypyc can compile it.

A repeated token costs a header scan, one dict probe and one clock read; everything else
(parsing, verifying, revocation checks, cookies and query parameters) stays in the policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

_now = time.time  # tokens carry wall-clock times; tests set the clock here


class Entry:
    """What a verified token grants, precomputed so that a cache hit only copies references."""

    __slots__ = ("consumer", "expires", "forward", "jti", "tenant", "vars")

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


class CachedTokens:
    """The request hook: a cached, unexpired token in the header is admitted here; anything else
        goes to ``miss`` (the policy's full path), a token to check for revocation to ``admit``, and
    two credentials to ``refuse``."""

    __slots__ = ("admit", "cache", "drop", "header", "miss", "refuse")

    def __init__(
        self,
        header: bytes,
        cache: dict[bytes, Entry],
        drop: frozenset[bytes],
        miss: Callable[[Any, bytes | None], Any],
        admit: Callable[[Any, Entry], Any],
        refuse: Callable[[Any, str], Any],
    ) -> None:
        self.header = header
        self.cache = cache
        self.drop = drop  # the forwarded claims' headers (and the credential's, if stripped)
        self.miss = miss
        self.admit = admit
        self.refuse = refuse

    # ``exchange`` is the engine's Exchange, but typed Any: compiled, a typed argument refuses any
    # other object, and the policy's tests drive it with light stand-ins.
    def check(self, exchange: Any) -> Any:
        name = self.header
        value: bytes | None = None
        for key, found in exchange.headers:
            if key == name:
                if value is not None:
                    # Two credentials: the upstream might read the one that was not checked.
                    return self.refuse(exchange, "invalid_token")
                value = found
        if value is None:
            return self.miss(exchange, None)
        entry = self.cache.get(value)
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
