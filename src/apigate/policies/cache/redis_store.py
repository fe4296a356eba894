"""The cache in Redis (``store: redis``): entries shared by every worker of every node that names
the same Redis in ``state.url``, each worker keeping a small hot copy of what it read.

Where an entry lives (every key of one URI under one hash tag, so one script reaches them all on a
Redis Cluster too; ``apigate:`` is the state backend's namespace)::

    apigate:{<uri>}:cn:<partition>            the Vary names of the URI's responses for a partition
    apigate:{<uri>}:ce:<partition>:<vary>     one entry: a partition's response for those Vary values
    apigate:{<uri>}:ci                        a set of the keys above (purging a URI deletes them)
    apigate:{cache-route␟<route>}:cr          the URIs a route stored: a sorted set, scored by expiry
    apigate:{cache-routes}:all                the routes that stored entries: the same

``<uri>`` is a digest of host, path and sorted query, ``<partition>`` one of the consumer and tenant
(``key_by``; ``-`` for none), ``<vary>`` one of the request's values of the Vary fields (``-`` for
none). A digest is a name, not a check: the entry itself holds its URI, partition and Vary values
and is served only when they are the request's, so one caller's entry never reaches another.

An entry is its status, fields, times and Vary names and values as JSON (orjson), then its body,
raw. Nothing read from Redis is ever unpickled or evaluated: a blob that is not exactly such an
entry (another version, another program's key, corruption) is a miss. An entry expires in Redis
when its freshness ends plus the staleness its response allows (``stale-while-revalidate``,
``stale-if-error``, RFC 5861), so Redis keeps nothing no request can use.

A request first asks the worker's hot layer (this class is a ``CacheStore``): an entry read from
Redis is kept there ``local_ttl`` (1 s by default), and so is the news that Redis has nothing for
a URI, so a hot key costs Redis one read per worker per ``local_ttl``, not one per request. A
read takes one round trip (the names and the entry of the Vary names last seen, in one script);
two when the URI's Vary names changed. Reads and writes go through the state backend, which
pipelines every call of a loop turn.

When Redis cannot answer, the cache is bypassed: requests go upstream (``X-Cache: BYPASS``),
nothing is stored, the outage is logged once and the requests are counted (``cache_bypassed``);
after ``RETRY_AFTER`` the next request tries Redis again.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import orjson

from apigate.policies.cache.freshness import Headers, cache_control, current_age, delta_seconds
from apigate.policies.cache.store import CacheStore, Entry, EntryId, Uri, add_store, vary_values
from apigate.state import StateUnavailable
from apigate.state.base import Script

if TYPE_CHECKING:
    import asyncio

    from apigate.engine.exchange import Exchange
    from apigate.policies.services import PolicyServices
    from apigate.state import StateBackend

log = logging.getLogger("apigate.cache")

MAGIC: Final = b"AGC1"  # what every entry blob starts with: the format and its version
FETCHED_KEY: Final = "cache.fetched"  # in an exchange's vars: Redis was read for this request
RETRY_AFTER: Final = 1.0  # after Redis failed to answer, requests bypass the cache this long
# The news a worker keeps besides entries (Vary names by URI, URIs Redis had nothing for): bounded.
MAX_REMEMBERED: Final = 10_000
ROUTES_TAG: Final = "cache-routes"
SEPARATOR: Final = "\x1f"
NONE_PART: Final = "-"
_BAD_FIELD_BYTES: Final = frozenset(b"\r\n\x00")


# -- names -----------------------------------------------------------------------------------------
def uri_tag(uri: Uri) -> str:
    """The hash tag of a URI's keys: a digest of host, path and sorted query."""
    host, path, query = uri
    digest = hashlib.sha256(host.encode("utf-8", "surrogatepass") + b"\x00")
    digest.update(path.encode("utf-8", "surrogatepass") + b"\x00" + query)
    return digest.hexdigest()[:32]


def partition_part(partition: str) -> str:
    if not partition:
        return NONE_PART
    return hashlib.sha256(partition.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def vary_part(varies: tuple[bytes | None, ...]) -> str:
    if not varies:
        return NONE_PART
    return hashlib.sha256(orjson.dumps([_text(v) for v in varies])).hexdigest()[:24]


def names_name(partition: str) -> str:
    return "cn:" + partition_part(partition)


def entry_name(partition: str, varies: tuple[bytes | None, ...]) -> str:
    return "ce:" + partition_part(partition) + ":" + vary_part(varies)


INDEX_NAME: Final = "ci"
ROUTE_INDEX_NAME: Final = "cr"
ROUTES_NAME: Final = "all"


def route_tag(route: str) -> str:
    return "cache-route" + SEPARATOR + route


def names_record(names: tuple[bytes, ...]) -> bytes:
    """The Vary names as stored (``v1:`` then the names, comma-separated)."""
    return b"v1:" + b",".join(names)


def parse_names(record: bytes) -> tuple[bytes, ...] | None:
    if not record.startswith(b"v1:"):
        return None
    names = tuple(name for name in record[3:].split(b",") if name)
    if any(not name.isascii() or name != name.strip().lower() or b" " in name for name in names):
        return None
    return names


def index_member(tag: str, uri: Uri) -> str:
    """A route index's member for a URI: its tag, host, path and query (the purge reads them)."""
    host, path, query = uri
    return SEPARATOR.join((tag, host, path, query.decode("latin-1")))


def parse_index_member(member: bytes | str) -> tuple[str, Uri] | None:
    text = member.decode("utf-8", "surrogatepass") if isinstance(member, bytes) else member
    parts = text.split(SEPARATOR)
    if len(parts) != 4:
        return None
    tag, host, path, query = parts
    try:
        return tag, (host, path, query.encode("latin-1"))
    except UnicodeEncodeError:
        return None


# -- the entry as bytes ----------------------------------------------------------------------------
def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def encode_entry(entry: Entry) -> bytes:
    """``MAGIC``, the length of the JSON head (4 bytes, big-endian), the head, the body."""
    host, path, query = entry.uri
    head = orjson.dumps(
        [
            host,
            path,
            query.decode("latin-1"),
            entry.partition,
            entry.route,
            [name.decode("latin-1") for name in entry.vary],
            [_text(value) for value in entry.varies],
            entry.status,
            [[name.decode("latin-1"), value.decode("latin-1")] for name, value in entry.headers],
            entry.response_time,
            entry.initial_age,
            entry.lifetime,
        ]
    )
    return MAGIC + len(head).to_bytes(4, "big") + head + entry.body


def decode_entry(blob: bytes) -> Entry | None:
    """The entry ``blob`` holds; None for anything that is not exactly one (never an error)."""
    try:
        if not isinstance(blob, bytes) or not blob.startswith(MAGIC) or len(blob) < 8:
            return None
        size = int.from_bytes(blob[4:8], "big")
        if size > len(blob) - 8:
            return None
        head = orjson.loads(blob[8 : 8 + size])
        if not isinstance(head, list) or len(head) != 12:
            return None
        host, path, query, partition, route, vary, varies, status, fields, response_time, age, lifetime = head
        if not all(isinstance(item, str) for item in (host, path, query, partition, route)):
            return None
        if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
            return None
        if not all(
            isinstance(item, int | float) and not isinstance(item, bool)
            for item in (response_time, age, lifetime)
        ):
            return None
        names = tuple(_field_bytes(name) for name in _strings(vary))
        values = tuple(None if value is None else _field_bytes(value) for value in _optional_strings(varies))
        headers: Headers = []
        for pair in fields if isinstance(fields, list) else [None]:
            if not isinstance(pair, list) or len(pair) != 2:
                return None
            headers.append((_field_bytes(pair[0]), _field_bytes(pair[1])))
        if len(values) != len(names):
            return None
        return Entry(
            uri=(host, path, query.encode("latin-1")),
            partition=partition,
            route=route,
            vary=names,
            varies=values,
            status=status,
            headers=headers,
            body=blob[8 + size :],
            response_time=float(response_time),
            initial_age=float(age),
            lifetime=float(lifetime),
        )
    except (ValueError, TypeError, UnicodeError, orjson.JSONDecodeError):
        return None


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError("not a list of strings")
    return value


def _optional_strings(value: Any) -> list[str | None]:
    if not isinstance(value, list) or not all(item is None or isinstance(item, str) for item in value):
        raise TypeError("not a list of strings")
    return value


def _field_bytes(text: str) -> bytes:
    """A field name or value as the engine writes it; one that could split a message is refused."""
    data = text.encode("latin-1")
    if _BAD_FIELD_BYTES.intersection(data):
        raise ValueError("a field with CR, LF or NUL")
    return data


def allowed_staleness(entry: Entry) -> float:
    """How long past its freshness a response may still serve (RFC 5861's stale-while-revalidate
    and stale-if-error, the longer): Redis keeps the entry that much longer."""
    directives = cache_control(entry.headers)
    found = [delta_seconds(directives.get(name)) for name in (b"stale-while-revalidate", b"stale-if-error")]
    return float(max((value for value in found if value is not None), default=0))


# -- scripts (one slot each: every key of a call shares its hash tag) ---------------------------------
def _redis_only(_data: Any, _keys: list[str], _args: list[Any]) -> Any:
    # `apigate check` refuses store: redis without a Redis in state.url, so this never runs.
    raise StateUnavailable("store: redis needs a Redis in state.url")


LOOKUP = Script(
    lua="""
local names = redis.call('GET', KEYS[1])
if not names then return {} end
if names ~= ARGV[1] then return {names} end
local entry = redis.call('GET', KEYS[2])
if not entry then return {names} end
return {names, entry}
""",
    python=_redis_only,
)
"""KEYS: the names record, the entry for the names guessed; ARGV: the guessed names record.
Answers [] (nothing for the URI and partition), [names] (other names, or no entry for these
values) or [names, entry]."""

STORE = Script(
    lua="""
local old = redis.call('GET', KEYS[1])
if old and old ~= ARGV[1] then
    local prefix = ARGV[4]
    for _, key in ipairs(redis.call('SMEMBERS', KEYS[3])) do
        if string.sub(key, 1, #prefix) == prefix then
            redis.call('DEL', key)
            redis.call('SREM', KEYS[3], key)
        end
    end
end
local ttl = tonumber(ARGV[3])
local left = redis.call('PTTL', KEYS[1])
if left < ttl then left = ttl end
redis.call('SET', KEYS[1], ARGV[1], 'PX', left)
redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
redis.call('SADD', KEYS[3], KEYS[1], KEYS[2])
if redis.call('PTTL', KEYS[3]) < left then redis.call('PEXPIRE', KEYS[3], left) end
return 1
""",
    python=_redis_only,
)
"""KEYS: names record, entry, the URI's index; ARGV: names record, entry blob, TTL (ms), the
prefix of the partition's entry keys. A response with other Vary names than the stored ones
replaces the partition's variants (the newest response says best which fields select it)."""

REMOVE_URI = Script(
    lua="""
local removed = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    if string.find(key, ':ce:', 1, true) then removed = removed + redis.call('DEL', key)
    else redis.call('DEL', key) end
end
redis.call('DEL', KEYS[1])
return removed
""",
    python=_redis_only,
)
"""KEYS: a URI's index. Deletes every key of the URI (all partitions and variants); answers how
many entries went."""

REMOVE_ENTRY = Script(
    lua="""
redis.call('SREM', KEYS[2], KEYS[1])
return redis.call('DEL', KEYS[1])
""",
    python=_redis_only,
)

INDEX = Script(
    lua="""
redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local left = tonumber(ARGV[2]) - tonumber(ARGV[3])
if redis.call('PTTL', KEYS[1]) < left then redis.call('PEXPIRE', KEYS[1], left) end
return 1
""",
    python=_redis_only,
)
"""KEYS: a sorted set; ARGV: a member, when it expires (ms since the epoch), now (ms). Members
that expired go, so the set holds what Redis holds, and the set itself expires with its last."""


def _raise_unanswered(reply: Any) -> Any:
    if isinstance(reply, StateUnavailable):
        raise reply
    return reply


class RedisLayer(CacheStore):
    """A worker's hot layer over the cache in Redis; the policy's store for ``store: redis``."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(0, 0, clock)
        self.monotonic = monotonic
        self.remote = self
        self.services: PolicyServices | None = None
        self.local_ttls: dict[str, float] = {}  # by route
        self.until: dict[EntryId, float] = {}  # when a hot entry must be read from Redis again
        self.names: OrderedDict[tuple[Uri, str], tuple[tuple[bytes, ...], float]] = OrderedDict()
        self.missing: OrderedDict[tuple[Uri, str], float] = OrderedDict()
        self.generation = 0  # moves with every purge: a read that began before one is not kept
        self.down = False
        self.down_until = 0.0
        self.bypassed = 0
        """Requests that bypassed the cache because Redis could not be used."""
        self.errors = 0
        """Redis calls that failed (reads, writes, deletions)."""
        self._handover: Entry | None = None

    # -- configuration --------------------------------------------------------------------------
    def configure(self, services: PolicyServices, route: str, local_ttl: float, local_max_bytes: int) -> None:
        """A route that caches here: its hot copies last ``local_ttl``; the layer holds at least
        ``local_max_bytes``."""
        self.services = services
        self.local_ttls[route] = local_ttl
        self.allow(local_max_bytes, max(self.max_entries, local_max_bytes // 512, 1000))

    def state(self) -> StateBackend | None:
        services = self.services
        state = services.state if services is not None else None
        return state if state is not None and state.shared else None

    # -- RemoteLayer ------------------------------------------------------------------------------
    def usable(self) -> bool:
        return not (self.down and self.monotonic() < self.down_until) and self.state() is not None

    def bypass(self) -> bool:
        if self.usable():
            return False
        if not self.down:  # no Redis behind state.url (one that failed is down already)
            self._failed(StateUnavailable("the state backend (state.url) is not a running Redis"))
        self.bypassed += 1
        return True

    def fetch(
        self, exchange: Exchange, uri: Uri, partition: str, route: str, again: Callable[[], Any]
    ) -> Any:
        found = exchange.vars()
        if found.pop(FETCHED_KEY, None) is not None:
            return None  # asked again after the read: what Redis had is in hand, or nothing is
        key = (uri, partition)
        until = self.missing.get(key)
        if until is not None:
            if self.monotonic() < until:
                return None
            del self.missing[key]
        state = self.state()
        if state is None:
            return None
        found[FETCHED_KEY] = True
        return self._fetch(state, uri, partition, exchange.headers, route, again)

    async def _fetch(
        self,
        state: StateBackend,
        uri: Uri,
        partition: str,
        headers: Headers,
        route: str,
        again: Callable[[], Any],
    ) -> Any:
        generation = self.generation
        try:
            entry, names = await self._read(state, uri, partition, headers)
        except Exception as exc:  # unanswered, or a bug: either way the request goes upstream
            self._failed(exc)
            entry = None
        else:
            self._answered()
            if generation == self.generation:  # no purge came meanwhile
                self._remember(uri, partition, entry, names, route)
                self._handover = entry
        try:
            result = again()
        finally:
            self._handover = None
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _read(
        self, state: StateBackend, uri: Uri, partition: str, headers: Headers
    ) -> tuple[Entry | None, tuple[bytes, ...] | None]:
        """The entry for this request and the URI's Vary names (None: nothing is stored for it)."""
        tag = uri_tag(uri)
        known = self.names.get((uri, partition))
        guess = known[0] if known is not None else ()
        for _attempt in range(2):
            record = names_record(guess)
            keys = [names_name(partition), entry_name(partition, vary_values(headers, guess))]
            reply = await state.decide(LOOKUP, tag, keys, [record], _raise_unanswered)
            if not reply:
                return None, None
            names = parse_names(reply[0])
            if names is None:
                return None, None  # not a record of ours: nothing usable
            if reply[0] != record:
                guess = names
                continue
            entry = decode_entry(reply[1]) if len(reply) > 1 else None
            if entry is not None and (
                entry.uri != uri
                or entry.partition != partition
                or entry.vary != names
                or entry.varies != vary_values(headers, names)
            ):
                entry = None  # another URI's or caller's under the same digest: never served
            return entry, names
        return None, guess  # the names changed twice while reading: a miss this time

    def _remember(
        self, uri: Uri, partition: str, entry: Entry | None, names: tuple[bytes, ...] | None, route: str
    ) -> None:
        local_ttl = self.local_ttls.get(route, 0.0)
        if local_ttl <= 0:
            return
        until = self.monotonic() + local_ttl
        key = (uri, partition)
        if names is None:
            _bounded_put(self.missing, key, until)
            return
        _bounded_put(self.names, key, (names, until))
        if entry is not None and CacheStore.put(self, entry):
            self.until[entry.id] = until

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.down_until = self.monotonic() + RETRY_AFTER
        if not self.down:
            self.down = True
            log.warning(
                "the cache's Redis cannot be used (%s: %s); requests bypass the cache until it answers",
                type(exc).__name__,
                exc,
            )

    def _answered(self) -> None:
        if self.down:
            self.down = False
            log.warning("the cache's Redis answers again; %d requests bypassed the cache", self.bypassed)

    # -- the hot layer ----------------------------------------------------------------------------
    def find(self, uri: Uri, partition: str, request_headers: Headers) -> Entry | None:
        handed = self._handover
        if (
            handed is not None
            and handed.uri == uri
            and handed.partition == partition
            and (not handed.vary or handed.varies == vary_values(request_headers, handed.vary))
        ):
            return handed
        entry = super().find(uri, partition, request_headers)
        if entry is not None and self.until.get(entry.id, 0.0) <= self.monotonic():
            self._remove(entry.id)  # read from Redis too long ago: read it again
            return None
        return entry

    def has_uri(self, uri: Uri, partition: str) -> bool:
        known = self.names.get((uri, partition))
        return (known is not None and known[1] > self.monotonic()) or super().has_uri(uri, partition)

    def _remove(self, entry_id: EntryId) -> bool:
        self.until.pop(entry_id, None)
        return super()._remove(entry_id)

    # -- writes go to Redis (and the hot layer) ----------------------------------------------------
    def put(self, entry: Entry) -> bool:
        state = self.state()
        if state is None or (self.down and self.monotonic() < self.down_until):
            return False
        now = self.clock()
        seconds = entry.lifetime - current_age(entry.initial_age, entry.response_time, now)
        seconds += allowed_staleness(entry)
        if seconds <= 0:
            return False
        ttl_ms = max(1, int(seconds * 1000))
        tag = uri_tag(entry.uri)
        names_key = names_name(entry.partition)
        prefix = state.tagged_keys(tag, ["ce:" + partition_part(entry.partition) + ":"])[0]
        try:
            blob = encode_entry(entry)
        except (TypeError, ValueError):  # a name JSON cannot carry (a lone surrogate): not stored
            return False
        args = [names_record(entry.vary), blob, ttl_ms, prefix]
        keys = [names_key, entry_name(entry.partition, entry.varies), INDEX_NAME]
        self._watch(state.decide(STORE, tag, keys, args, _raise_unanswered))
        now_ms = int(now * 1000)
        expires = [index_member(tag, entry.uri), now_ms + ttl_ms, now_ms]
        self._watch(
            state.decide(INDEX, route_tag(entry.route), [ROUTE_INDEX_NAME], expires, _raise_unanswered)
        )
        routes = [entry.route, now_ms + ttl_ms, now_ms]
        self._watch(state.decide(INDEX, ROUTES_TAG, [ROUTES_NAME], routes, _raise_unanswered))
        key = (entry.uri, entry.partition)
        self.missing.pop(key, None)
        local_ttl = self.local_ttls.get(entry.route, 0.0)
        if local_ttl > 0:
            until = self.monotonic() + local_ttl
            _bounded_put(self.names, key, (entry.vary, until))
            if CacheStore.put(self, entry):
                self.until[entry.id] = until
        return True

    def remove(self, entry: Entry) -> bool:
        removed = super().remove(entry)
        state = self.state()
        if state is not None:
            tag = uri_tag(entry.uri)
            keys = [entry_name(entry.partition, entry.varies), INDEX_NAME]
            self._watch(state.decide(REMOVE_ENTRY, tag, keys, [], _raise_unanswered))
        return removed

    def invalidate(self, uri: Uri) -> int:
        """RFC 9111 §4.4 after an unsafe method: the URI goes here and in Redis (other workers'
        hot copies end within their ``local_ttl``)."""
        removed = self._forget(lambda key: key[0] == uri, lambda: CacheStore.invalidate(self, uri))
        state = self.state()
        if state is not None:
            self._watch(state.decide(REMOVE_URI, uri_tag(uri), [INDEX_NAME], [], _raise_unanswered))
        return removed

    def _watch(self, future: asyncio.Future[Any]) -> None:
        future.add_done_callback(self._written)

    def _written(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self._failed(error)
        else:
            self._answered()

    # -- purges reach the hot layer only: the purger deleted the entries in Redis ---------------------
    def _forget(self, matches: Callable[[tuple[Uri, str]], bool], purge: Callable[[], int]) -> int:
        self.generation += 1
        for remembered in (self.names, self.missing):
            for key in [key for key in remembered if matches(key)]:
                del remembered[key]
        return purge()

    def purge_key(self, host: str, path: str, query: bytes = b"") -> int:
        from apigate.policies.cache.store import normalised_query

        uri = (host.lower(), path, normalised_query(query))
        return self._forget(lambda key: key[0] == uri, lambda: CacheStore.invalidate(self, uri))

    def purge_route(self, route: str) -> int:
        # The news of a URI does not name its route: all of it goes (it is re-read in one round trip).
        return self._forget(lambda _key: True, lambda: super(RedisLayer, self).purge_route(route))

    def purge_prefix(self, path_prefix: str, host: str | None = None) -> int:
        wanted = host.lower() if host is not None else None

        def matches(key: tuple[Uri, str]) -> bool:
            return key[0][1].startswith(path_prefix) and (wanted is None or key[0][0] == wanted)

        return self._forget(matches, lambda: super(RedisLayer, self).purge_prefix(path_prefix, host))

    def purge_all(self) -> int:
        self.until.clear()
        return self._forget(lambda _key: True, lambda: super(RedisLayer, self).purge_all())


def _bounded_put(remembered: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    remembered[key] = value
    remembered.move_to_end(key)
    if len(remembered) > MAX_REMEMBERED:
        remembered.popitem(last=False)


_LAYER: RedisLayer | None = None


def current_layer() -> RedisLayer | None:
    """This process's hot layer over Redis; None while no route caches there."""
    return _LAYER


def hot_layer(services: PolicyServices, route: str, local_ttl: float, local_max_bytes: int) -> RedisLayer:
    """This process's hot layer over Redis (made on first use, shared by every route that caches
    there), configured for ``route``."""
    global _LAYER
    if _LAYER is None:
        _LAYER = RedisLayer()
        add_store(_LAYER)
    _LAYER.configure(services, route, local_ttl, local_max_bytes)
    return _LAYER
