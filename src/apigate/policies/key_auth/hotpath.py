"""The `key-auth` policy's usual request, kept free of pydantic so that mypyc can compile it.

The usual request carries one key in the header, and that key is valid with no deadline,
address list or time window: it is admitted here. Every other request (no key, a key in the
query, client-sent forwarded headers, a refusal, a key with conditions, its forward headers not
built yet) goes to the policy's full check, which decides alone: nothing is changed before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from apigate.engine.exchange import Exchange


class KeyCheck:
    __slots__ = ("forward_token", "full", "hide", "key_header", "required", "services", "watched")

    def __init__(
        self,
        services: Any,
        key_header: bytes,
        watched: frozenset[bytes],
        hide: bool,
        required: frozenset[str],
        forward_token: bytes,
        full: Callable[[Exchange], Any],
    ) -> None:
        self.services = services
        self.key_header = key_header
        self.watched = watched  # the key's header and the forwarded ones
        self.hide = hide
        self.required = required
        self.forward_token = forward_token
        self.full = full

    def check(self, exchange: Exchange) -> Any:
        services = self.services
        registry = services.consumers if services is not None else None
        if registry is None:
            return self.full(exchange)
        headers = exchange.headers
        key_header = self.key_header
        watched = self.watched
        found: tuple[bytes, bytes] | None = None
        for pair in headers:
            if pair[0] in watched:
                if found is not None or pair[0] != key_header:
                    return self.full(exchange)  # the key twice, or a forwarded header sent
                found = pair
        if found is None or not found[1]:
            return self.full(exchange)
        match = registry.lookup(found[1])
        if (
            match is None
            or match.deadline is not None
            or match.networks is not None
            or match.schedule is not None
            or (self.required and not self.required <= match.scopes)
        ):
            return self.full(exchange)
        forwards = match.forwards.get(self.forward_token)
        if forwards is None:
            return self.full(exchange)
        if self.hide:
            headers.remove(found)  # found by identity: no comparison of values
        admit(exchange, headers, match, forwards)
        return None


def admit(exchange: Exchange, headers: list[tuple[bytes, bytes]], match: Any, forwards: list[Any]) -> None:
    """An accepted key: the consumer's headers go upstream, the consumer and scopes to the exchange."""
    if forwards:
        headers += forwards
    consumer = match.consumer
    exchange.consumer = consumer
    exchange.tenant = consumer.tenant
    exchange.vars()["scopes"] = match.scopes
