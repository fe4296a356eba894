"""Whose requests count together: the key of a request, built from its parts (compiled with the engine).

A key is made of parts (``ip``, ``consumer``, ``header:x-team``...). A part the request lacks
(no consumer, no such header or claim) makes the whole key missing, and the caller uses the
fallback key. Parts of a combined key are length-prefixed, so values that contain the
separator cannot make two different combinations meet in one counter.
"""

from __future__ import annotations

from typing import Any, Final

from apigate.engine.exchange import Exchange

IP: Final = 0
CONSUMER: Final = 1
KEY_ID: Final = 2
TENANT: Final = 3
ROUTE: Final = 4
METHOD: Final = 5
HEADER: Final = 6
CLAIM: Final = 7
_KINDS: Final = {
    "ip": IP,
    "consumer": CONSUMER,
    "key_id": KEY_ID,
    "tenant": TENANT,
    "route": ROUTE,
    "method": METHOD,
}
# A header or claim value longer than this counts by its first characters (keys stay small).
MAX_PART: Final = 256


class KeyBuilder:
    def __init__(self, parts: list[str]) -> None:
        kinds: list[int] = []
        arguments: list[str] = []
        for part in parts:
            kind, _, argument = part.partition(":")
            kinds.append(_KINDS.get(kind, HEADER if kind == "header" else CLAIM))
            arguments.append(argument)
        self.kinds = kinds
        self.arguments = arguments
        self.header_names = [argument.encode("latin-1") for argument in arguments]
        self.only_ip = kinds == [IP]

    def build(self, exchange: Exchange) -> str | None:
        """The request's key, or None when one of its parts is missing."""
        if self.only_ip:
            return exchange.client_ip
        kinds = self.kinds
        if len(kinds) == 1:
            return self.part(exchange, 0)
        pieces: list[str] = []
        for index in range(len(kinds)):
            value = self.part(exchange, index)
            if value is None:
                return None
            pieces.append(f"{len(value)}:{value}")
        return "|".join(pieces)

    def part(self, exchange: Exchange, index: int) -> str | None:
        kind = self.kinds[index]
        if kind == IP:
            return exchange.client_ip
        if kind == CONSUMER:
            return exchange.consumer_id()  # a consumer record's id, or the name an identity policy set
        if kind == TENANT:
            return exchange.tenant
        if kind == METHOD:
            return exchange.method
        if kind == ROUTE:
            route: Any = exchange.route
            return str(route.name) if route is not None else None
        if kind == HEADER:
            value = exchange.header(self.header_names[index])
            return value[:MAX_PART].decode("latin-1") if value else None
        state = exchange.state
        if state is None:
            return None
        if kind == KEY_ID:
            key_id = state.get("key_id")
            return str(key_id) if key_id is not None else None
        claims = state.get("claims")  # CLAIM
        if claims is None:
            return None
        claim = claims.get(self.arguments[index])
        if claim is None or isinstance(claim, dict | list):
            return None
        return str(claim)[:MAX_PART]
