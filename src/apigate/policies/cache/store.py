"""The cache's store: stored responses in memory, least recently used first out, bounded by their
total size and count; one per worker process, shared by the routes that cache.

An entry is found by its URI (host, path, sorted query), its partition (the consumer or tenant
when the route keys by them, else empty) and the values of the request fields its response's
Vary names. The store also keeps the requests in flight for a URI and partition, so that
concurrent misses wait for one upstream answer (``Flight``).

A store may sit in front of a ``RemoteLayer`` (``store: redis``, ``redis_store.py``): it is then
that layer's hot copy in the worker, and a request it cannot answer asks the layer first.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from apigate.policies.cache.freshness import Headers, joined

Uri = tuple[str, str, bytes]  # host, path, query with its parameters sorted
VaryValues = tuple[bytes | None, ...]
EntryId = tuple[Uri, str, tuple[bytes, ...], VaryValues]
# What a 304 carries of the stored response (RFC 9110 §15.4.5).
NOT_MODIFIED_FIELDS: Final = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary"}
)
# What an entry costs besides its body and fields (its objects, its place in the indexes).
ENTRY_OVERHEAD: Final = 256


def normalised_query(query: bytes) -> bytes:
    """The query with its parameters sorted (``b=2&a=1`` and ``a=1&b=2`` are one key); empty
    parameters dropped."""
    if not query:
        return b""
    params = [param for param in query.split(b"&") if param]
    if len(params) < 2:
        return params[0] if params else b""
    return b"&".join(sorted(params))


def vary_values(request_headers: Headers, names: tuple[bytes, ...]) -> VaryValues:
    """The request's values of the fields ``names`` (joined, whitespace around commas removed)."""
    values: list[bytes | None] = []
    for name in names:
        value = joined(request_headers, name)
        values.append(None if value is None else b",".join(part.strip() for part in value.split(b",")))
    return tuple(values)


@dataclass(slots=True)
class Entry:
    """A stored response: its status, fields (without framing, Age or the gateway's own) and body,
    and what its freshness is computed from."""

    uri: Uri
    partition: str
    route: str
    vary: tuple[bytes, ...]
    varies: VaryValues
    status: int
    headers: Headers
    body: bytes
    response_time: float  # when it arrived (the store's clock)
    initial_age: float  # its corrected initial age then (RFC 9111 §4.2.3)
    lifetime: float  # its freshness lifetime
    size: int = 0
    # Made once, read by every hit: the key, the fields of a full answer without its Content-Type
    # (a Reply's own), and those of a 304 (RFC 9110 §15.4.5: Last-Modified only without an ETag).
    id: EntryId = ((), "", (), ())  # type: ignore[assignment]
    content_type: bytes = b""
    reply_headers: Headers = field(default_factory=list)
    not_modified_headers: Headers = field(default_factory=list)

    def __post_init__(self) -> None:
        self.id = (self.uri, self.partition, self.vary, self.varies)
        has_etag = False
        for name, value in self.headers:
            if name == b"content-type" and not self.content_type:
                self.content_type = value
                continue
            self.reply_headers.append((name, value))
            if name in NOT_MODIFIED_FIELDS:
                self.not_modified_headers.append((name, value))
                has_etag = has_etag or name == b"etag"
        if not has_etag:
            self.not_modified_headers += [pair for pair in self.headers if pair[0] == b"last-modified"]


@dataclass(slots=True)
class Flight:
    """An upstream request that concurrent misses for the same URI and partition wait for."""

    waiters: list[tuple[asyncio.Future[Any], Callable[[], Any]]] = field(default_factory=list)


class RemoteLayer(Protocol):
    """Where entries live beyond the worker (Redis), as the policy's request hook meets it."""

    def usable(self) -> bool:
        """False while the layer cannot be used (Redis down); nothing counted."""

    def bypass(self) -> bool:
        """True while the layer cannot be used (Redis down): the request goes upstream, nothing is
        stored (counted, and logged once per outage)."""

    def fetch(self, exchange: Any, uri: Uri, partition: str, route: str, again: Callable[[], Any]) -> Any:
        """None when the worker's store already knows all there is (the request goes on at
        once); else an awaitable that reads the layer, hands what it found to the worker's store
        (kept there as long as ``route`` says) and resolves to ``again()``: the request hook run
        once more, which now finds it."""


class CacheStore:
    """Stored responses, least recently used evicted first past ``max_bytes`` or ``max_entries``."""

    remote: RemoteLayer | None = None
    """The layer this store is the hot copy of (None: the store is all there is)."""

    def __init__(self, max_bytes: int, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.clock = clock
        """The store's time (seconds since the epoch): every age and freshness is computed with it."""
        self.entries: OrderedDict[EntryId, Entry] = OrderedDict()
        self.by_uri: dict[Uri, set[EntryId]] = {}
        self.flights: dict[tuple[Uri, str], Flight] = {}
        self.size = 0
        self.hits = 0
        """Requests answered from the store (the node's ``requests_cached``)."""

    def __len__(self) -> int:
        return len(self.entries)

    def allow(self, max_bytes: int, max_entries: int) -> None:
        """Raise the bounds to at least these (each route that caches states its own)."""
        self.max_bytes = max(self.max_bytes, max_bytes)
        self.max_entries = max(self.max_entries, max_entries)

    def find(self, uri: Uri, partition: str, request_headers: Headers) -> Entry | None:
        """The entry for this URI and partition whose Vary fields match the request's; None when
        there is none (or more than one would, the most recently used wins)."""
        ids = self.by_uri.get(uri)
        if not ids:
            return None
        best: Entry | None = None
        for entry_id in ids:
            if entry_id[1] != partition:
                continue
            entry = self.entries[entry_id]
            if entry.vary and entry.varies != vary_values(request_headers, entry.vary):
                continue
            if best is None or entry.response_time > best.response_time:
                best = entry
        if best is not None:
            self.entries.move_to_end(best.id)
        return best

    def has_uri(self, uri: Uri, partition: str) -> bool:
        return any(entry_id[1] == partition for entry_id in self.by_uri.get(uri, ()))

    def put(self, entry: Entry) -> bool:
        """Store ``entry``, replacing the one with the same key, evicting the least recently used
        past the bounds; False when it alone exceeds them."""
        entry.size = len(entry.body) + sum(len(n) + len(v) for n, v in entry.headers) + ENTRY_OVERHEAD
        if entry.size > self.max_bytes or self.max_entries < 1:
            return False
        # Another variant of the same URI with other Vary fields is replaced: the response's Vary
        # decides which request fields select it, and the newest response says that best.
        for entry_id in list(self.by_uri.get(entry.uri, ())):
            if entry_id[1] == entry.partition and entry_id[2] != entry.vary:
                self._remove(entry_id)
        self._remove(entry.id)
        self.entries[entry.id] = entry
        self.by_uri.setdefault(entry.uri, set()).add(entry.id)
        self.size += entry.size
        while self.size > self.max_bytes or len(self.entries) > self.max_entries:
            self._remove(next(iter(self.entries)))
        return True

    def remove(self, entry: Entry) -> bool:
        return self._remove(entry.id)

    def _remove(self, entry_id: EntryId) -> bool:
        entry = self.entries.pop(entry_id, None)
        if entry is None:
            return False
        self.size -= entry.size
        ids = self.by_uri.get(entry.uri)
        if ids is not None:
            ids.discard(entry_id)
            if not ids:
                del self.by_uri[entry.uri]
        return True

    def _remove_where(self, matches: Callable[[Entry], bool]) -> int:
        doomed = [entry_id for entry_id, entry in self.entries.items() if matches(entry)]
        for entry_id in doomed:
            self._remove(entry_id)
        return len(doomed)

    # -- invalidation and purge -----------------------------------------------------------------
    def invalidate(self, uri: Uri) -> int:
        """Remove every entry of ``uri`` (all partitions, all variants); how many went."""
        return sum(self._remove(entry_id) for entry_id in list(self.by_uri.get(uri, ())))

    def purge_key(self, host: str, path: str, query: bytes = b"") -> int:
        """Remove the entries of one URI (``query`` as the request sent it)."""
        return self.invalidate((host.lower(), path, normalised_query(query)))

    def purge_route(self, route: str) -> int:
        """Remove the entries stored by the route named ``route``."""
        return self._remove_where(lambda entry: entry.route == route)

    def purge_prefix(self, path_prefix: str, host: str | None = None) -> int:
        """Remove the entries whose path starts with ``path_prefix`` (on ``host`` only, if given)."""
        wanted = host.lower() if host is not None else None
        return self._remove_where(
            lambda entry: entry.uri[1].startswith(path_prefix) and (wanted is None or entry.uri[0] == wanted)
        )

    def purge_all(self) -> int:
        count = len(self.entries)
        self.entries.clear()
        self.by_uri.clear()
        self.size = 0
        return count

    # -- collapsed misses -------------------------------------------------------------------------
    def lead(self, key: tuple[Uri, str]) -> Flight | None:
        """A new flight for ``key`` when none is in the air (the caller goes upstream and must
        ``land`` it); None when one is (the caller may wait for it)."""
        if key in self.flights:
            return None
        flight = Flight()
        self.flights[key] = flight
        return flight

    def wait(self, key: tuple[Uri, str], answer: Callable[[], Any], timeout: float) -> asyncio.Future[Any]:
        """A future settled with ``answer()`` when the flight for ``key`` lands, or with None after
        ``timeout`` seconds (the waiter then goes upstream itself)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        flight = self.flights[key]
        waiter = (future, answer)
        flight.waiters.append(waiter)

        def give_up() -> None:
            if not future.done():
                future.set_result(None)
            if waiter in flight.waiters:
                flight.waiters.remove(waiter)

        handle = loop.call_later(timeout, give_up)
        future.add_done_callback(lambda _: handle.cancel())
        return future

    def land(self, key: tuple[Uri, str], flight: Flight) -> None:
        """The leader's answer is stored (or will not be): each waiter gets its own answer."""
        if self.flights.get(key) is flight:
            del self.flights[key]
        waiters = flight.waiters
        flight.waiters = []
        for future, answer in waiters:
            if future.done():
                continue
            try:
                result = answer()
            except Exception:  # the waiter goes upstream itself
                result = None
            future.set_result(result)


_STORE: CacheStore | None = None
_OTHERS: list[CacheStore] = []  # hot layers of a remote store (redis_store.py), for the counts


def add_store(store: CacheStore) -> None:
    """Count ``store`` (a hot layer) in ``all_stores``."""
    if store not in _OTHERS:
        _OTHERS.append(store)


def all_stores() -> list[CacheStore]:
    """Every store of this process: the memory store (if a route caches there) and hot layers."""
    return ([_STORE] if _STORE is not None else []) + _OTHERS


def current_store() -> CacheStore | None:
    """This process's store, None while no route caches."""
    return _STORE


def shared_store() -> CacheStore:
    """This process's store (made on first use, bounded by what the routes that cache ``allow``):
    every route that caches shares it."""
    global _STORE
    if _STORE is None:
        _STORE = CacheStore(0, 0)
    return _STORE
