"""The `cache` policy's per-request paths, kept free of pydantic so that mypyc can compile them.

The request a cache answers most is a fresh hit: a GET or HEAD without Cache-Control, Pragma or
conditions of its own, whose stored response is fresh. ``CacheHooks.on_request`` answers it
here; any other request, and one whose stored response is missing or stale, goes to the policy's
whole request phase (``lookup``), which decides by RFC 9111 (for a request without directives it
uses a stored response while it is fresh, as here). The response, response_body and log hooks
pass over a request answered from the store here too, and hand the others to the policy.

``serve`` makes every answer from the store, hits and the policy's stale and revalidated ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from apigate.engine.exchange import Exchange
from apigate.engine.replies import Reply
from apigate.policies.cache.freshness import current_age, not_modified
from apigate.policies.cache.store import normalised_query

if TYPE_CHECKING:
    from apigate.policies.cache.store import CacheStore, Entry, Uri

STATE_KEY: Final = "cache.lookup"
# The request's outcome, for the access log's ``cache`` field: hit, stale, miss, revalidated,
# bypass, or refresh (the gateway's own request refreshing a stale entry in the background).
OUTCOME_KEY: Final = "cache"
CACHE_STATUS_NAME: Final = b"apigate"
# Request fields that may change what the store answers (directives, conditions): a request with
# any of them is decided by the policy in full.
DECIDING_FIELDS: Final = frozenset({b"cache-control", b"pragma", b"if-none-match", b"if-modified-since"})


class Served:
    """The request was answered from the store: the response hooks leave it alone."""


SERVED: Final = Served()


def uri_of(exchange: Exchange) -> Uri:
    """The request's URI as the store keys it: host, path, query with its parameters sorted."""
    host = exchange.host
    return (host.lower() if host is not None else "", exchange.path, normalised_query(exchange.query))


def partition_of(exchange: Exchange, by_consumer: bool, by_tenant: bool) -> str:
    """The caller's part of the key: its consumer and/or tenant (empty when the route shares entries)."""
    if not by_consumer and not by_tenant:
        return ""
    consumer = (exchange.consumer_id() or "") if by_consumer else ""
    tenant = (exchange.tenant or "") if by_tenant else ""
    # Its length first: a consumer id holding the separator cannot pass for another
    # consumer in another tenant (ids come from tokens and may hold any character).
    return f"{len(consumer)}:{consumer}\x00{tenant}"


def ttl_status(kind: bytes, entry: Entry, age: float) -> bytes:
    """A Cache-Status value with the entry's remaining freshness (RFC 9211 §2.4: negative once stale)."""
    return b"%s; %s; ttl=%d" % (CACHE_STATUS_NAME, kind, math.floor(entry.lifetime - age))


def serve(
    exchange: Exchange, entry: Entry, age: float, outcome: bytes, status_value: bytes, conditional: bool
) -> Reply:
    """``entry`` as the answer (a 304 when the request is ``conditional`` and its conditions
    match), with its Age, ``X-Cache: outcome`` and ``Cache-Status: status_value``."""
    state = exchange.vars()
    state[STATE_KEY] = SERVED
    state[OUTCOME_KEY] = outcome.decode().lower()
    fields = [(b"age", b"%d" % int(age)), (b"x-cache", outcome), (b"cache-status", status_value)]
    if conditional and entry.status == 200 and not_modified(exchange.headers, entry.headers):
        return Reply(304, b"", entry.not_modified_headers + fields, b"")
    return Reply(entry.status, entry.body, entry.reply_headers + fields, entry.content_type)


class CacheHooks:
    """The hooks the engine calls, compiled: a fresh hit answered at once, every other request
    handed to the policy (``lookup``, ``respond``, ``capture``, ``landed``: its Python methods)."""

    def __init__(
        self,
        store: CacheStore,
        by_consumer: bool,
        by_tenant: bool,
        lookup: Callable[[Exchange], Any],
        respond: Callable[[Exchange, Any], Reply | None],
        capture: Callable[[Any], Any],
        landed: Callable[[Any], None],
    ) -> None:
        self.store = store
        self.by_consumer = by_consumer
        self.by_tenant = by_tenant
        self.lookup = lookup
        self.respond = respond
        self.capture = capture
        self.landed = landed

    def on_request(self, exchange: Exchange) -> Any:
        method = exchange.method
        if method != "GET" and method != "HEAD":
            return self.lookup(exchange)
        for pair in exchange.headers:
            if pair[0] in DECIDING_FIELDS:
                return self.lookup(exchange)
        store = self.store
        remote = store.remote
        if remote is not None and not remote.usable():
            return self.lookup(exchange)  # which bypasses it (and counts the request)
        entry = store.find(
            uri_of(exchange), partition_of(exchange, self.by_consumer, self.by_tenant), exchange.headers
        )
        if entry is None:
            return self.lookup(exchange)
        age = current_age(entry.initial_age, entry.response_time, store.clock())
        if age >= entry.lifetime:
            return self.lookup(exchange)
        return self.answer(exchange, entry, age, b"", False)

    def answer(self, exchange: Exchange, entry: Entry, age: float, detail: bytes, conditional: bool) -> Reply:
        """The fresh stored response as the answer to this request (a 304 when it is
        ``conditional`` and its conditions match)."""
        self.store.hits += 1
        return serve(exchange, entry, age, b"HIT", ttl_status(b"hit", entry, age) + detail, conditional)

    def on_response(self, exchange: Exchange) -> Reply | None:
        found = _found(exchange)
        return None if found is None else self.respond(exchange, found)

    def on_response_body(self, exchange: Exchange) -> Any:
        found = _found(exchange)
        return None if found is None else self.capture(found)

    def on_log(self, exchange: Exchange) -> None:
        found = _found(exchange)
        if found is not None:
            self.landed(found)


def _found(exchange: Exchange) -> Any:
    """What the request phase left for the later hooks: None when nothing (another method, an
    answer from the store)."""
    state = exchange.state
    if state is None:
        return None
    found = state.get(STATE_KEY)
    return None if found is SERVED else found
