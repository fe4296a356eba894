"""The `cache` policy: a shared HTTP cache in memory (RFC 9111), one store per worker process.

A GET or HEAD whose stored response is fresh is answered from memory, without the upstream:
its status, fields and body, with ``Age``, ``X-Cache: HIT`` and ``Cache-Status`` (RFC 9211); a
conditional request (If-None-Match, If-Modified-Since) whose stored response matches gets a 304.
A miss goes upstream, and the response is stored while it streams to the client (the
response_body phase) when a shared cache may store it: a GET, a final status other than 206,
neither ``no-store`` (request or response), ``private``, ``no-cache`` nor ``Vary: *``, no
Set-Cookie unless ``store_set_cookie``, an Authorization-bearing request only with ``public``,
``s-maxage`` or ``must-revalidate`` (RFC 9111 §3.5), a body of at most ``max_entry_size``, and a
freshness lifetime: s-maxage, max-age or Expires, else the route's ``ttl``, else the heuristic of
RFC 9111 §4.2.2 (a tenth of the time since Last-Modified, at most ``heuristic_max``); the
last two only for statuses cacheable by default or ``public`` responses.

The key is the URI (host, path, query with its parameters sorted; HEAD shares GET's entry), the
request fields the stored response's Vary names, and, with ``key_by``, the consumer or tenant.
Concurrent misses for one key make one upstream request; the others wait for its answer (at most
``collapse_wait``, then go upstream themselves). A POST, PUT, PATCH or DELETE answered with a
2xx or 3xx removes the entries of its URI and of its same-origin Location and Content-Location
(RFC 9111 §4.4). The store (``policies/cache/store.py``) can be purged by URI, route, path prefix
or whole from Python.

A stale entry is revalidated: a GET without conditions of its own goes upstream with the
stored ETag and Last-Modified (If-None-Match, If-Modified-Since); a 304 freshens the entry (RFC
9111 §4.3.4) and the client gets the stored response (the response hook replaces the upstream's
304 with it), a full response replaces it. A client's own conditional request goes as it is, and
a 304 that validates the stored response freshens it too. A stale entry may be served as it is
where RFC 5861 or the request allows (``stale.py``): within ``stale-while-revalidate`` at once,
while one request refreshes it in the background (a copy of the request sent for no client);
within ``stale-if-error`` when the upstream cannot be reached or answers 500, 502, 503 or 504;
within the request's ``max-stale``. ``must-revalidate`` and ``proxy-revalidate`` forbid all of
it: an upstream that cannot be reached then gives 504 (RFC 9111 §5.2.2.2).

Requests with Authorization: a response to one is stored only when it says ``public``,
``s-maxage`` or ``must-revalidate`` (RFC 9111 §3.5), or when the route keys entries by consumer
and an authentication policy identified the caller: the entry is then that identity's, and is
never served to another.

The Pactown gateway shorthand ``cache: 60s`` is this policy with that ``ttl``, keyed by consumer
and tenant (on a route with ``auth:``, each caller's answers are kept apart).

The engine calls the compiled hooks of ``hotpath.py``: a fresh hit for a request without
directives or conditions of its own is answered there; every other request comes to ``_lookup``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal
from urllib.parse import urlsplit

from pydantic import Field

from apigate.config.units import ByteSize, Duration, parse_duration
from apigate.engine.replies import Reply, error_body
from apigate.policies.base import Policy
from apigate.policies.cache.config import StorageConfig
from apigate.policies.cache.freshness import (
    Headers,
    cache_control,
    current_age,
    delta_seconds,
    first,
    format_http_date,
    freshness_lifetime,
    initial_age,
    refusal,
    vary_names,
)
from apigate.policies.cache.hotpath import (
    CACHE_STATUS_NAME,
    OUTCOME_KEY,
    SERVED,
    STATE_KEY,
    CacheHooks,
    partition_of,
    serve,
    ttl_status,
    uri_of,
)
from apigate.policies.cache.purge import PURGES
from apigate.policies.cache.redis_store import hot_layer
from apigate.policies.cache.stale import (
    CLIENT_CONDITIONS,
    ERROR_STATUSES,
    IF_ERROR,
    REFRESHES,
    WHILE_REVALIDATE,
    max_stale,
    must_revalidate,
    stale_window,
    validators,
)
from apigate.policies.cache.store import (
    CacheStore,
    Entry,
    EntryId,
    Flight,
    Uri,
    normalised_query,
    shared_store,
    vary_values,
)
from apigate.policies.registry import register

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

UNSAFE_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Fields a stored response does not keep: the framing and the Age are the gateway's to write,
# as are its own request id and cache fields.
NOT_STORED: Final = frozenset({b"content-length", b"age", b"x-request-id", b"x-cache", b"cache-status"})
# Fields of a 304 that do not replace the stored response's: they describe its own (empty) message.
FRAMING_FIELDS: Final = frozenset(
    {b"content-length", b"content-type", b"content-encoding", b"content-range", b"transfer-encoding"}
)
_NO_DIRECTIVES: Final[dict[bytes, bytes | None]] = {}
_NO_CACHE: Final[dict[bytes, bytes | None]] = {b"no-cache": None}
_NO_STORE: Final[dict[bytes, bytes | None]] = {b"no-store": None}


class CacheConfig(StorageConfig):
    ttl: Duration | None = Field(
        default=None, gt=0, description="freshness of responses that state none (no max-age, Expires)"
    )
    max_bytes: ByteSize = Field(default=64 << 20, ge=1, description="memory of the worker's store")
    max_entries: int = Field(default=10_000, ge=1, description="responses the worker's store keeps")
    max_entry_size: ByteSize = Field(
        default=1 << 20, ge=0, description="larger bodies are passed on and not stored"
    )
    key_by: list[Literal["consumer", "tenant"]] = Field(
        default_factory=list, description="keep one entry per consumer and/or tenant"
    )
    store_set_cookie: bool = Field(default=False, description="store responses that set cookies")
    heuristic_max: Duration = Field(
        default=86_400.0, ge=0, description="cap of the Last-Modified heuristic freshness (0: never)"
    )
    collapse_wait: Duration = Field(
        default=5.0, ge=0, description="how long concurrent misses wait for one upstream answer (0: never)"
    )
    stale_while_revalidate: Duration | None = Field(
        default=None,
        ge=0,
        description="serve a stale response this long past its freshness while one request refreshes it, "
        "for responses without a stale-while-revalidate of their own (RFC 5861)",
    )
    stale_if_error: Duration | None = Field(
        default=None,
        ge=0,
        description="serve a stale response this long past its freshness when the upstream fails, "
        "for responses and requests without a stale-if-error of their own (RFC 5861)",
    )


@dataclass(slots=True)
class Lookup:
    """What the request phase learnt, for the response phases of a forwarded GET or HEAD."""

    uri: Uri
    partition: str
    request_time: float
    request_directives: dict[bytes, bytes | None]
    authorized: bool
    outcome: bytes = b"MISS"  # X-Cache
    forward: bytes = b"uri-miss"  # Cache-Status fwd=
    flight: Flight | None = None
    capture: Capture | None = None
    stale: Entry | None = None  # the stored response a 304 from the upstream may freshen
    validating: bool = False  # the request carries the gateway's validators of ``stale``
    refresh: EntryId | None = None  # a refresh in the background (no client waits) of this entry


@dataclass(slots=True)
class Unsafe:
    """A POST, PUT, PATCH or DELETE: its URI is invalidated when it succeeds."""

    uri: Uri


@dataclass(slots=True)
class Capture:
    """The response body filter of a response being stored: passes each piece on unchanged and
    keeps a copy, up to ``limit`` bytes; past it the copy is dropped and nothing is stored."""

    policy: CachePolicy
    lookup: Lookup
    entry: Entry
    limit: int
    pieces: list[bytes] = field(default_factory=list)
    size: int = 0
    given_up: bool = False

    def feed(self, chunk: bytes) -> bytes:
        if not self.given_up:
            self.size += len(chunk)
            if self.size > self.limit:
                self.given_up = True
                self.pieces = []
                self.policy.land(self.lookup)
            else:
                self.pieces.append(chunk)
        return chunk

    def end(self) -> bytes:
        if not self.given_up:
            self.entry.body = b"".join(self.pieces)
            self.pieces = []
            self.policy.keep(self.lookup, self.entry)
        return b""


@register
class CachePolicy(Policy[CacheConfig]):
    name = "cache"
    # Request phase: after authentication, limits and request transforms (a hit still counts
    # against the limits; the consumer is known for key_by). Response phase, which runs in reverse
    # order: first, so the stored response is the upstream's, before other policies edit it (they
    # edit an answer from the store again), and its body before any compression.
    order = 8000
    phases = frozenset({"request", "response", "response_body", "log"})
    # The upstream's 304 to the gateway's own revalidation becomes the stored response, and an
    # upstream failure a stale one (stale-if-error) or a 504 (must-revalidate).
    replaces_responses = True
    # The state backend carries purge notices to every worker (and holds entries: store: redis).
    needs = frozenset({"state"})
    shorthand: ClassVar[str | None] = "cache"
    shorthand_forms: ClassVar[str] = "a duration such as 60s or 5m"

    @classmethod
    def expand_shorthand(cls, value: str) -> dict[str, Any] | None:
        try:
            seconds = parse_duration(value)
        except ValueError:
            return None
        # Keyed by caller: on a route with authentication each identity gets its own entries (and
        # answers to requests with Authorization may then be stored); elsewhere nobody is
        # identified and entries are shared.
        return {"ttl": seconds, "key_by": ["consumer", "tenant"]} if seconds > 0 else None

    def prepare(self) -> None:
        config = self.config
        if config.store == "redis":
            store: CacheStore = hot_layer(self.services, self.route, config.local_ttl, config.local_max_bytes)
        else:
            store = shared_store()
            store.allow(config.max_bytes, config.max_entries)
        PURGES.listen(self.services.state)
        self.ttl = config.ttl
        self.by_consumer = "consumer" in config.key_by
        self.by_tenant = "tenant" in config.key_by
        self.hooks = CacheHooks(
            store, self.by_consumer, self.by_tenant, self._lookup, self._respond, self._capture, self._landed
        )
        self.engine_hooks = {
            "request": self.hooks.on_request,
            "response": self.hooks.on_response,
            "response_body": self.hooks.on_response_body,
            "log": self.hooks.on_log,
        }

    @property
    def store(self) -> CacheStore:
        return self.hooks.store

    @store.setter
    def store(self, store: CacheStore) -> None:
        self.hooks.store = store

    # -- request ---------------------------------------------------------------------------------
    def on_request(self, exchange: Exchange) -> Any:
        return self.hooks.on_request(exchange)

    def _lookup(self, exchange: Exchange) -> Any:
        """The request phase in full (``CacheHooks.on_request`` answers fresh hits itself)."""
        method = exchange.method
        if method != "GET" and method != "HEAD":
            if method in UNSAFE_METHODS:
                exchange.vars()[STATE_KEY] = Unsafe(uri_of(exchange))
            return None
        store = self.store
        headers = exchange.headers
        # One pass for what decides the lookup; most requests carry none of these.
        has_directives = pragma = authorized = conditional = False
        for name, value in headers:
            if name == b"cache-control":
                has_directives = True
            elif name == b"authorization":
                authorized = True
            elif name == b"pragma":
                pragma = pragma or value.strip().lower() == b"no-cache"
            elif name == b"if-none-match" or name == b"if-modified-since":
                conditional = True
        directives = cache_control(headers) if has_directives else _NO_DIRECTIVES
        if not directives and pragma:
            directives = _NO_CACHE  # RFC 9111 §5.4, when Cache-Control is absent
        uri = uri_of(exchange)
        partition = partition_of(exchange, self.by_consumer, self.by_tenant)
        if authorized and self.by_consumer and exchange.consumer_id():
            # The entry is this identity's alone (the authentication policy verified it): a
            # response to its Authorization is stored for it, as a private cache would.
            authorized = False
        now = store.clock()
        # RFC 9111 §5.2.1.7: a stored response that suits the request, else 504, never upstream.
        only_cached = b"only-if-cached" in directives
        if b"no-store" in directives:
            if only_cached:
                return self._not_cached(exchange)
            return self._bypass(exchange, Lookup(uri, partition, now, directives, authorized), b"bypass")
        if b"no-cache" in directives or delta_seconds(directives.get(b"max-age")) == 0:
            if only_cached:
                return self._not_cached(exchange)
            return self._bypass(exchange, Lookup(uri, partition, now, directives, authorized), b"request")
        remote = store.remote
        if remote is not None and remote.bypass():  # Redis is down: upstream, nothing stored
            return self._bypass(exchange, Lookup(uri, partition, now, _NO_STORE, authorized), b"bypass")
        entry = store.find(uri, partition, headers)
        if entry is None and remote is not None:
            fetched = remote.fetch(
                exchange, uri, partition, self.route, lambda: self.hooks.on_request(exchange)
            )
            if fetched is not None:
                return fetched
        if entry is not None:
            age = current_age(entry.initial_age, entry.response_time, now)
            if self._usable(entry, age, directives):
                return self.hooks.answer(exchange, entry, age, b"", conditional)
            if age >= entry.lifetime:
                served = self._stale_answer(exchange, entry, age, directives, conditional)
                if served is not None:
                    return served
        if only_cached:
            return self._not_cached(exchange)
        lookup = Lookup(uri, partition, now, directives, authorized)
        if entry is not None:
            # Stale, or fresh but older than the request's max-age or min-fresh allow.
            lookup.forward = b"stale" if age >= entry.lifetime else b"request"
            lookup.stale = entry
            if method == "GET" and not conditional:
                self._validate(exchange, lookup, entry)
        elif store.has_uri(uri, partition):
            lookup.forward = b"vary-miss"
        exchange.vars()[STATE_KEY] = lookup
        if method == "GET" and self.config.collapse_wait > 0:
            key = (uri, partition)
            flight = store.lead(key)
            if flight is None:
                return store.wait(
                    key, lambda: self._collapsed(exchange, key, conditional), self.config.collapse_wait
                )
            lookup.flight = flight
        return None

    def _bypass(self, exchange: Exchange, lookup: Lookup, forward: bytes) -> None:
        """The request's own directives send it upstream (``no-store``: nothing is stored)."""
        lookup.outcome, lookup.forward = b"BYPASS", forward
        exchange.vars()[STATE_KEY] = lookup

    def _usable(self, entry: Entry, age: float, directives: dict[bytes, bytes | None]) -> bool:
        """Fresh, and fresh enough for the request's max-age and min-fresh (RFC 9111 §5.2.1)."""
        if age >= entry.lifetime:
            return False
        if b"max-age" in directives:
            max_age = delta_seconds(directives[b"max-age"])
            if max_age is not None and age > max_age:
                return False
        min_fresh = delta_seconds(directives.get(b"min-fresh"))
        return min_fresh is None or entry.lifetime - age >= min_fresh

    def _stale_answer(
        self,
        exchange: Exchange,
        entry: Entry,
        age: float,
        directives: dict[bytes, bytes | None],
        conditional: bool,
    ) -> Reply | None:
        """The stale ``entry`` served as it is, when the request's max-stale or the response's (or
        the route's) stale-while-revalidate allows it; None: it goes upstream. A client that asks
        for fresher (min-fresh) or younger (max-age without max-stale) gets no stale answer."""
        if b"min-fresh" in directives:
            return None
        stale_for = age - entry.lifetime
        response = cache_control(entry.headers)  # only stale entries pay for reading them again
        accepted = max_stale(directives, response)
        max_age = delta_seconds(directives.get(b"max-age"))
        if max_age is not None and age > max_age:
            return None
        if accepted is not None and stale_for <= accepted:
            self.store.hits += 1
            return serve(exchange, entry, age, b"STALE", ttl_status(b"hit", entry, age), conditional)
        if b"max-age" in directives or exchange.method != "GET":
            return None
        window = stale_window(WHILE_REVALIDATE, response, _NO_DIRECTIVES, self.config.stale_while_revalidate)
        if window is None or stale_for >= window:
            return None
        self._refresh(exchange, entry)
        self.store.hits += 1
        status_value = ttl_status(b"hit", entry, age) + b"; detail=stale-while-revalidate"
        return serve(exchange, entry, age, b"STALE", status_value, conditional)

    def _refresh(self, exchange: Exchange, entry: Entry) -> None:
        """Refresh ``entry`` in the background, once however many requests find it stale: a copy
        of this request, with the stored validators instead of the client's conditions, sent
        upstream for no client; its response hooks freshen or replace the entry."""
        if not REFRESHES.start(entry.id):
            return
        authorized = any(name == b"authorization" for name, _ in exchange.headers)
        if authorized and self.by_consumer and exchange.consumer_id():
            authorized = False  # as in on_request: the entry is this identity's
        lookup = Lookup(
            entry.uri, entry.partition, self.store.clock(), _NO_DIRECTIVES, authorized, b"REFRESH", b"stale"
        )
        lookup.stale = entry
        lookup.refresh = entry.id
        headers = [pair for pair in exchange.headers if pair[0] not in CLIENT_CONDITIONS]
        found = validators(entry.headers)
        headers += found
        lookup.validating = bool(found)
        copy = None
        try:
            copy = exchange.detached_copy(headers, {STATE_KEY: lookup, OUTCOME_KEY: "refresh"})
        finally:
            if copy is None:
                REFRESHES.end(entry.id)  # not sent (the gateway drains): the next request tries

    def _validate(self, exchange: Exchange, lookup: Lookup, entry: Entry) -> None:
        """Send the stored response's validators with this GET (RFC 9111 §4.3.1), so that a 304
        freshens it; the client, which sent no conditions, then gets the stored response."""
        found = validators(entry.headers)
        if found:
            exchange.headers = [*exchange.headers, *found]
            lookup.validating = True

    def _not_cached(self, exchange: Exchange) -> Reply:
        """``only-if-cached`` and nothing stored suits the request: 504 (RFC 9111 §5.2.1.7)."""
        state = exchange.vars()
        state[STATE_KEY] = SERVED
        state[OUTCOME_KEY] = "miss"
        message = "nothing stored suits the request, which said only-if-cached"
        fields = [(b"x-cache", b"MISS"), (b"cache-status", b"%s; detail=only-if-cached" % CACHE_STATUS_NAME)]
        return Reply(504, error_body(message, exchange.request_id, "not_cached"), fields, reason="not_cached")

    def _collapsed(self, exchange: Exchange, key: tuple[Uri, str], conditional: bool) -> Reply | None:
        """A waiting miss, once the request it waited for is answered: from the store when that
        answer was stored (and suits this request's Vary fields), else None (it goes upstream)."""
        entry = self.store.find(key[0], key[1], exchange.headers)
        if entry is None:
            lookup = exchange.vars().get(STATE_KEY)
            if isinstance(lookup, Lookup):
                lookup.forward = b"miss"
            return None
        age = current_age(entry.initial_age, entry.response_time, self.store.clock())
        if age >= entry.lifetime:
            return None
        return self.hooks.answer(exchange, entry, age, b"; collapsed", conditional)

    # -- response --------------------------------------------------------------------------------
    def on_response(self, exchange: Exchange) -> Reply | None:
        return self.hooks.on_response(exchange)

    def _respond(self, exchange: Exchange, found: Lookup | Unsafe) -> Reply | None:
        """The response hook of a request the store did not answer."""
        # The upstream's head arrived (else the gateway answers: an error, a policy's refusal). An
        # error after a retried answer counts too, harmlessly: no gateway error is storable.
        answered = exchange.t_first_byte > 0.0
        status = exchange.response_status
        if isinstance(found, Unsafe):
            if answered and 200 <= status < 400:
                self._invalidate(exchange, found.uri)
            return None
        lookup: Lookup = found
        headers = exchange.response_headers
        stored = False
        if lookup.stale is not None and lookup.refresh is None:
            replacement = self._instead(exchange, lookup, lookup.stale, answered, status, headers)
            if replacement is not None:
                self.land(lookup)
                return replacement
        if answered and status == 304 and lookup.stale is not None:
            self._freshen(exchange, lookup, lookup.stale, headers)
            stored = lookup.outcome == b"REVALIDATED"
        elif answered:
            entry = self._entry(exchange, lookup, status, headers)
            if entry is not None:
                length = first(headers, b"content-length")
                if exchange.method == "GET" and status == 204:
                    self.keep(lookup, entry)
                    stored = True
                elif length is None or (length.isdigit() and int(length) <= self.config.max_entry_size):
                    lookup.capture = Capture(self, lookup, entry, self.config.max_entry_size)
                    stored = length is not None
        if lookup.capture is None:
            self.land(lookup)
        status_value = b"%s; fwd=%s" % (CACHE_STATUS_NAME, lookup.forward)
        if lookup.outcome == b"REVALIDATED":
            status_value += b"; fwd-status=304"
        if lookup.refresh is None:  # a refresh keeps its own outcome for the log
            exchange.vars()[OUTCOME_KEY] = lookup.outcome.decode().lower()
        headers.append((b"x-cache", lookup.outcome))
        headers.append((b"cache-status", status_value + b"; stored" if stored else status_value))
        return None

    def _instead(
        self, exchange: Exchange, lookup: Lookup, stale: Entry, answered: bool, status: int, headers: Headers
    ) -> Reply | None:
        """What the client gets instead of this response to a request that found ``stale``: the
        stored response freshened by the upstream's 304 to the gateway's validators; the stale
        response when the upstream failed within stale-if-error; a 504 when it failed and the
        stale response must be revalidated. None: the response goes as it is."""
        if answered and status == 304 and lookup.validating:
            return self._revalidated(exchange, lookup, stale, headers)
        # The gateway's own error for an upstream it could not use (it names the failure), or
        # the upstream's own error status.
        unreachable = exchange.failure is not None and status in ERROR_STATUSES
        if not unreachable and not (answered and status in ERROR_STATUSES):
            return None
        age = current_age(stale.initial_age, stale.response_time, self.store.clock())
        response = cache_control(stale.headers)
        window = stale_window(IF_ERROR, response, lookup.request_directives, self.config.stale_if_error)
        if window is not None and age - stale.lifetime <= window:
            # RFC 9211: forwarded because stale; the upstream's status when it answered at all.
            kind = b"fwd=stale" if unreachable else b"fwd=stale; fwd-status=%d" % status
            status_value = ttl_status(kind, stale, age) + b"; detail=stale-if-error"
            self.store.hits += 1
            # The client's own conditions decide a 304 (the gateway's validators are not theirs).
            return serve(exchange, stale, age, b"STALE", status_value, not lookup.validating)
        if unreachable and age >= stale.lifetime and must_revalidate(response):
            return self._must_revalidate(exchange)
        return None

    def _revalidated(self, exchange: Exchange, lookup: Lookup, stale: Entry, headers: Headers) -> Reply:
        """The upstream's 304 to the gateway's validators: the freshened stored response (the
        304 replaced by it), or 502 when the 304 names another representation."""
        entry = self._freshen(exchange, lookup, stale, headers)
        if entry is None:
            self.store.remove(stale)  # contradicted: the next request fetches it whole
            state = exchange.vars()
            state[STATE_KEY] = SERVED
            state[OUTCOME_KEY] = "miss"
            message = (
                "the upstream answered the revalidation of the stored response with another representation"
            )
            body = error_body(message, exchange.request_id, "invalid_revalidation")
            return Reply(502, body, [(b"x-cache", b"MISS")], reason="invalid_revalidation")
        age = current_age(entry.initial_age, entry.response_time, self.store.clock())
        status_value = b"%s; fwd=stale; fwd-status=304" % CACHE_STATUS_NAME
        if lookup.outcome == b"REVALIDATED":
            status_value += b"; stored"
        return serve(exchange, entry, age, b"REVALIDATED", status_value, False)

    def _must_revalidate(self, exchange: Exchange) -> Reply:
        """RFC 9111 §5.2.2.2: a stale response that must be revalidated is not served when the
        upstream cannot be reached; the gateway answers 504."""
        state = exchange.vars()
        state[STATE_KEY] = SERVED
        state[OUTCOME_KEY] = "miss"
        message = "the upstream could not be reached and the stored response must be revalidated"
        body = error_body(message, exchange.request_id, exchange.failure)
        fields = [
            (b"x-cache", b"MISS"),
            (b"cache-status", b"%s; fwd=stale; detail=must-revalidate" % CACHE_STATUS_NAME),
        ]
        return Reply(504, body, fields, reason=exchange.failure)

    def _freshen(self, exchange: Exchange, lookup: Lookup, stale: Entry, headers: Headers) -> Entry | None:
        """A 304 that validates the stale stored response freshens it (RFC 9111 §4.3.4): its
        fields replace the stored ones, but for those of the content's framing and type, and its
        Date and Age start the response's age anew. It validates it with the same ETag (or when
        neither has one), or, answering the gateway's own validators, which named that response
        alone, without an ETag. Returns the response as freshened (stored, unless the 304 now
        forbids it: the entry is then removed); None when the 304 validates another."""
        etag = first(headers, b"etag")
        stored_etag = first(stale.headers, b"etag")
        if etag != stored_etag and not (lookup.validating and etag is None):
            return None
        if exchange.method != "GET":
            return None  # a HEAD's 304 is passed on; the stored response stays as it was
        # The stored Date goes in any case: without the 304's own, the time it came is the Date.
        given = {b"date", *(name for name, _ in headers if name not in FRAMING_FIELDS)}
        merged = [pair for pair in stale.headers if pair[0] not in given]
        merged += [pair for pair in headers if pair[0] not in FRAMING_FIELDS]
        entry = self._entry(exchange, lookup, stale.status, merged)
        if entry is None:
            self.store.remove(stale)  # what the upstream says now forbids keeping it
            return stale
        entry.body = stale.body
        self.store.put(entry)
        lookup.outcome = b"REVALIDATED"
        return entry

    def _entry(self, exchange: Exchange, lookup: Lookup, status: int, headers: Headers) -> Entry | None:
        """The entry to store for this response; None when it must not be stored or has no
        freshness lifetime."""
        directives = cache_control(headers)
        if refusal(
            exchange.method,
            status,
            lookup.request_directives,
            directives,
            headers,
            lookup.authorized,
            self.config.store_set_cookie,
        ):
            return None
        response_time = self.store.clock()
        kept = [pair for pair in headers if pair[0] not in NOT_STORED]
        if first(kept, b"date") is None:  # RFC 9110 §6.6.1: a cache adds the Date it lacks
            kept.append((b"date", format_http_date(response_time)))
        lifetime = freshness_lifetime(status, directives, kept, self.ttl, self.config.heuristic_max)
        if lifetime is None or lifetime.seconds <= 0:
            return None
        names = vary_names(kept) or ()
        ages = [pair for pair in headers if pair[0] == b"age"]  # not stored, but counted
        return Entry(
            uri=lookup.uri,
            partition=lookup.partition,
            route=self.route,
            vary=names,
            varies=vary_values(exchange.headers, names),
            status=status,
            headers=kept,
            body=b"",
            response_time=response_time,
            initial_age=initial_age([*kept, *ages], lookup.request_time, response_time),
            lifetime=lifetime.seconds,
        )

    def on_response_body(self, exchange: Exchange) -> Capture | None:
        found: Capture | None = self.hooks.on_response_body(exchange)
        return found

    def _capture(self, found: Lookup | Unsafe) -> Capture | None:
        """The body filter of a response being stored (handed over once)."""
        if isinstance(found, Lookup) and found.capture is not None:
            capture = found.capture
            found.capture = None
            return capture
        return None

    def on_log(self, exchange: Exchange) -> None:
        self.hooks.on_log(exchange)

    def _landed(self, found: Lookup | Unsafe) -> None:
        """The exchange of a request the store did not answer is finished."""
        if isinstance(found, Lookup):
            self.land(found)  # the response was cut, or never stored
            if found.refresh is not None:
                REFRESHES.end(found.refresh)  # the next request to find it stale may refresh it

    def keep(self, lookup: Lookup, entry: Entry) -> None:
        self.store.put(entry)
        self.land(lookup)

    def land(self, lookup: Lookup) -> None:
        flight = lookup.flight
        if flight is not None:
            lookup.flight = None
            self.store.land((lookup.uri, lookup.partition), flight)

    def _invalidate(self, exchange: Exchange, uri: Uri) -> None:
        """RFC 9111 §4.4: the target URI, and the Location and Content-Location of the same origin."""
        store = self.store
        store.invalidate(uri)
        for name in (b"location", b"content-location"):
            value = first(exchange.response_headers, name)
            if value is None:
                continue
            try:
                parts = urlsplit(value.decode("latin-1").strip())
            except ValueError:
                continue
            if parts.netloc and parts.netloc.lower() != uri[0]:
                continue  # another origin: not ours to invalidate
            if parts.path.startswith("/"):
                store.invalidate((uri[0], parts.path, normalised_query(parts.query.encode("latin-1"))))
