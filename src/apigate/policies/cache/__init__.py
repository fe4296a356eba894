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

A stale entry is replaced by the next full response, or freshened by a 304 the upstream gives
a client's own conditional request (RFC 9111 §4.3.4).

The Pactown gateway shorthand ``cache: 60s`` is this policy with that ``ttl``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal
from urllib.parse import urlsplit

from pydantic import Field

from apigate.config.units import ByteSize, Duration, parse_duration
from apigate.engine.replies import Reply
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
    not_modified,
    refusal,
    vary_names,
)
from apigate.policies.cache.purge import PURGES
from apigate.policies.cache.redis_store import hot_layer
from apigate.policies.cache.store import (
    CacheStore,
    Entry,
    Flight,
    Uri,
    normalised_query,
    shared_store,
    vary_values,
)
from apigate.policies.registry import register

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

STATE_KEY: Final = "cache.lookup"
# The request's outcome, for the access log's ``cache`` field: hit, miss, revalidated or bypass.
OUTCOME_KEY: Final = "cache"
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
CACHE_STATUS_NAME: Final = b"apigate"


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


@dataclass(slots=True)
class Unsafe:
    """A POST, PUT, PATCH or DELETE: its URI is invalidated when it succeeds."""

    uri: Uri


class Served:
    """The request was answered from the store: the response hooks leave it alone."""


SERVED: Final = Served()


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
        return {"ttl": seconds} if seconds > 0 else None

    def prepare(self) -> None:
        config = self.config
        if config.store == "redis":
            self.store: CacheStore = hot_layer(
                self.services, self.route, config.local_ttl, config.local_max_bytes
            )
        else:
            self.store = shared_store()
            self.store.allow(config.max_bytes, config.max_entries)
        PURGES.listen(self.services.state)
        self.ttl = config.ttl
        self.by_consumer = "consumer" in config.key_by
        self.by_tenant = "tenant" in config.key_by

    # -- request ---------------------------------------------------------------------------------
    def _uri(self, exchange: Exchange) -> Uri:
        return ((exchange.host or "").lower(), exchange.path, normalised_query(exchange.query))

    def _partition(self, exchange: Exchange) -> str:
        if not self.by_consumer and not self.by_tenant:
            return ""
        consumer = (exchange.consumer_id() or "") if self.by_consumer else ""
        tenant = (exchange.tenant or "") if self.by_tenant else ""
        return f"{consumer}\x00{tenant}"

    def on_request(self, exchange: Exchange) -> Any:
        method = exchange.method
        if method != "GET" and method != "HEAD":
            if method in UNSAFE_METHODS:
                exchange.vars()[STATE_KEY] = Unsafe(self._uri(exchange))
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
        uri = self._uri(exchange)
        partition = self._partition(exchange)
        now = store.clock()
        if b"no-store" in directives:
            return self._bypass(exchange, Lookup(uri, partition, now, directives, authorized), b"bypass")
        if b"no-cache" in directives or delta_seconds(directives.get(b"max-age")) == 0:
            return self._bypass(exchange, Lookup(uri, partition, now, directives, authorized), b"request")
        remote = store.remote
        if remote is not None and remote.bypass():  # Redis is down: upstream, nothing stored
            return self._bypass(exchange, Lookup(uri, partition, now, _NO_STORE, authorized), b"bypass")
        entry = store.find(uri, partition, headers)
        if entry is None and remote is not None:
            fetched = remote.fetch(exchange, uri, partition, self.route, lambda: self.on_request(exchange))
            if fetched is not None:
                return fetched
        if entry is not None:
            age = current_age(entry.initial_age, entry.response_time, now)
            if self._usable(entry, age, directives):
                return self.answer(exchange, entry, age, b"", conditional)
        lookup = Lookup(uri, partition, now, directives, authorized)
        if entry is not None:
            lookup.forward = b"stale"
            lookup.stale = entry
        elif store.has_uri(uri, partition):
            lookup.forward = b"vary-miss"
        exchange.vars()[STATE_KEY] = lookup
        if method == "GET" and self.config.collapse_wait > 0:
            key = (uri, partition)
            flight = store.lead(key)
            if flight is None:
                return store.wait(key, lambda: self._collapsed(exchange, key), self.config.collapse_wait)
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

    def _collapsed(self, exchange: Exchange, key: tuple[Uri, str]) -> Reply | None:
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
        return self.answer(exchange, entry, age, b"; collapsed", True)

    def answer(self, exchange: Exchange, entry: Entry, age: float, detail: bytes, conditional: bool) -> Reply:
        """The stored response as the answer to this request (a 304 when it is ``conditional`` and
        its conditions match)."""
        state = exchange.vars()
        state[STATE_KEY] = SERVED
        state[OUTCOME_KEY] = "hit"
        self.store.hits += 1
        fields: Headers = [
            (b"age", b"%d" % int(age)),
            (b"x-cache", b"HIT"),
            (b"cache-status", b"%s; hit; ttl=%d%s" % (CACHE_STATUS_NAME, int(entry.lifetime - age), detail)),
        ]
        if conditional and entry.status == 200 and not_modified(exchange.headers, entry.headers):
            return Reply(304, b"", entry.not_modified_headers + fields, b"")
        return Reply(entry.status, entry.body, entry.reply_headers + fields, entry.content_type)

    # -- response --------------------------------------------------------------------------------
    def on_response(self, exchange: Exchange) -> None:
        state = exchange.state
        found = state.get(STATE_KEY) if state is not None else None
        if found is None or found is SERVED:
            return
        # The upstream's head arrived (else the gateway answers: an error, a policy's refusal). An
        # error after a retried answer counts too, harmlessly: no gateway error is storable.
        answered = exchange.t_first_byte > 0.0
        status = exchange.response_status
        if isinstance(found, Unsafe):
            if answered and 200 <= status < 400:
                self._invalidate(exchange, found.uri)
            return
        lookup: Lookup = found
        headers = exchange.response_headers
        stored = False
        if answered and status == 304 and lookup.stale is not None:
            stored = self._freshen(exchange, lookup, lookup.stale, headers)
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
        exchange.vars()[OUTCOME_KEY] = lookup.outcome.decode().lower()
        headers.append((b"x-cache", lookup.outcome))
        headers.append((b"cache-status", status_value + b"; stored" if stored else status_value))

    def _freshen(self, exchange: Exchange, lookup: Lookup, stale: Entry, headers: Headers) -> bool:
        """A 304 that validates the stale stored response (the same ETag, or neither has one)
        freshens it (RFC 9111 §4.3.4): its fields replace the stored ones, but for those of the
        content's framing and type, and its Date and Age start the response's age anew."""
        etag = first(headers, b"etag")
        if etag != first(stale.headers, b"etag"):
            return False
        # The stored Date goes in any case: without the 304's own, the time it came is the Date.
        given = {b"date", *(name for name, _ in headers if name not in FRAMING_FIELDS)}
        merged = [pair for pair in stale.headers if pair[0] not in given]
        merged += [pair for pair in headers if pair[0] not in FRAMING_FIELDS]
        entry = self._entry(exchange, lookup, stale.status, merged)
        if entry is None:
            self.store.remove(stale)  # what the upstream says now forbids keeping it
            return False
        entry.body = stale.body
        self.store.put(entry)
        lookup.outcome = b"REVALIDATED"
        return True

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
        state = exchange.state
        found = state.get(STATE_KEY) if state is not None else None
        if isinstance(found, Lookup) and found.capture is not None:
            capture = found.capture
            found.capture = None
            return capture
        return None

    def on_log(self, exchange: Exchange) -> None:
        state = exchange.state
        found = state.get(STATE_KEY) if state is not None else None
        if isinstance(found, Lookup):
            self.land(found)  # the response was cut, or never stored

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
