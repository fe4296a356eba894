"""The `key-auth` policy's usual request, kept free of pydantic so that mypyc can compile it.

The usual request carries one key in the header, and that key is valid with no deadline,
address list or time window: it is admitted here. Every other request (no key, a key in the
query, client-sent forwarded headers, a refusal, a key with conditions, its forward headers not
built yet) goes to the policy's full check, which decides alone: nothing is changed before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from mypy_extensions import i64

from apigate.consumers.keyindex import KeyIndex, KeyMatch
from apigate.engine.exchange import CompiledRequestHook, Exchange

LONG_NAME: Final = 62  # the bit of a name length mask that stands for this length and longer (i64)


def name_lengths(names: frozenset[bytes]) -> i64:
    """A mask with bit n set when one of ``names`` is n bytes long: a header whose name has
    another length is none of them, which one shift tells without hashing the name."""
    mask: i64 = 0
    for name in names:
        mask |= 1 << min(len(name), LONG_NAME)
    return mask


class KeyCheck(CompiledRequestHook):
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
        self.index: KeyIndex | None = None  # the running registry's, found on first use
        self.key_header = key_header
        self.watched = watched  # the key's header and the forwarded ones
        self.watched_lengths = name_lengths(watched)
        self.hide = hide
        self.required = required
        self.scoped = bool(required)
        self.forward_token = forward_token
        self.full = full
        # The match admitted last and its forwards here (a match's forwards, once made, stay).
        self.last_match: KeyMatch | None = None
        self.last_forwards: list[tuple[bytes, bytes]] = []

    def run(self, exchange: Exchange) -> Any:
        index = self.index
        if index is None or not index.live:
            index = self.index = self._running_index()
            if index is None:
                return self.full(exchange)
        headers = exchange.headers
        key_header = self.key_header
        watched = self.watched
        lengths = self.watched_lengths
        found: i64 = -1
        for position in range(len(headers)):
            name = headers[position][0]
            # Every operand an i64: a plain int in the shift would box the length on each header.
            size: i64 = len(name)
            if size > LONG_NAME:
                size = LONG_NAME
            if (lengths >> size) & 1:
                if name == key_header:  # compared before the set: no hash of the name
                    if found >= 0:
                        return self.full(exchange)  # the key twice
                    found = position
                elif name in watched:
                    return self.full(exchange)  # a forwarded header sent by the client
        if found < 0:
            return self.full(exchange)
        key = headers[found][1]
        if not key:
            return self.full(exchange)
        match = index.lookup(key)
        if match is None or not match.unconditional or (self.scoped and not self.required <= match.scopes):
            return self.full(exchange)
        if match is self.last_match:  # this configuration's forwards for the key it admitted last
            forwards = self.last_forwards
        else:
            found_forwards = match.forwards.get(self.forward_token)
            if found_forwards is None:
                return self.full(exchange)
            forwards = self.last_forwards = found_forwards
            self.last_match = match
        if self.hide:
            headers.pop(found)
        admit(exchange, headers, match, forwards)
        return None

    def _running_index(self) -> KeyIndex | None:
        registry = self.services.consumers  # the policy's PolicyServices
        return registry.keys if registry is not None else None


def admit(
    exchange: Exchange, headers: list[tuple[bytes, bytes]], match: KeyMatch, forwards: list[Any]
) -> None:
    """An accepted key: its consumer's headers go upstream; consumer, scopes and key id to the
    exchange (the key id: rate limits and quotas may count per key)."""
    if forwards:
        headers.extend(forwards)
    exchange.identify(match.consumer, match.consumer_id)
    exchange.tenant = match.tenant
    variables = exchange.state
    if variables is None:
        exchange.state = match.variables.copy()  # a copy of a small dict: no insert per item
    else:
        variables.update(match.variables)
