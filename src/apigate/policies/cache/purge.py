"""Purging the cache everywhere it is kept: in this process, in Redis, and in every other worker
of every node.

A purge names one URI (host, path, query), a route, a path prefix (on one host, or all) or
everything. ``purge()`` (Python) and ``apigate cache purge`` (the CLI) do it in three steps:

1. the stores of this process (the memory store, the hot layer over Redis) drop what matches;
2. with Redis in ``state.url``: the entries in Redis go (a URI: its index of keys, in one script;
   a route: the URIs its index lists; a prefix: the URIs of every route's index under it;
   everything: every URI index SCAN finds, then the route indexes), read and deleted in batches
   of ``BATCH``, so memory stays bounded whatever Redis holds;
3. a notice on the ``cache-purge`` channel tells every worker of every node (each one subscribes
   while a route caches, ``PurgeListener``), which drops the same from its own stores, within
   milliseconds. Without Redis, the workers of one node share no channel: the CLI asks the node's
   admin listener, which asks each worker over the node link (``apply_purge`` answers there).

A notice is small JSON (``{"all": true}``, ``{"route": "r"}``, ``{"prefix": "/p", "host": null}``,
``{"url": ["host", "/path", "a=1"]}``); one that is not exactly such a thing is ignored and logged,
never an error in a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import orjson

from apigate.engine.paths import PathRefused, normalize_path
from apigate.policies.cache.redis_store import (
    INDEX_NAME,
    REMOVE_URI,
    ROUTE_INDEX_NAME,
    ROUTES_NAME,
    ROUTES_TAG,
    current_layer,
    parse_index_member,
    route_tag,
    uri_tag,
)
from apigate.policies.cache.store import Uri, all_stores, normalised_query
from apigate.state.calls import same_slot

if TYPE_CHECKING:
    from apigate.state import StateBackend, Subscription
    from apigate.state.base import Message

log = logging.getLogger("apigate.cache")

PURGE_CHANNEL: Final = "cache-purge"
MAX_NOTICE_BYTES: Final = 16 * 1024
MAX_FIELD_CHARS: Final = 4096
BATCH: Final = 500  # keys read (SCAN, ZSCAN) and URIs deleted at a time


class PurgeError(ValueError):
    """A purge that cannot be understood; the message says why."""


@dataclass(frozen=True, slots=True)
class Purge:
    """What to purge: ``everything``, or entries of ``route``, or under ``prefix`` (on ``host``
    when given), or of ``uri``."""

    everything: bool = False
    route: str | None = None
    prefix: str | None = None
    host: str | None = None
    uri: Uri | None = None

    def notice(self) -> dict[str, Any]:
        if self.everything:
            return {"all": True}
        if self.route is not None:
            return {"route": self.route}
        if self.prefix is not None:
            return {"prefix": self.prefix, "host": self.host}
        assert self.uri is not None
        host, path, query = self.uri
        return {"url": [host, path, query.decode("latin-1")]}

    def describe(self) -> str:
        if self.everything:
            return "everything"
        if self.route is not None:
            return f"route {self.route}"
        if self.prefix is not None:
            return f"paths under {self.prefix}" + (f" on {self.host}" if self.host else "")
        assert self.uri is not None
        host, path, query = self.uri
        return f"{host}{path}" + (f"?{query.decode('latin-1')}" if query else "")


def purge_everything() -> Purge:
    return Purge(everything=True)


def purge_route(route: str) -> Purge:
    return Purge(route=_field(route, "route"))


def purge_prefix(prefix: str, host: str | None = None) -> Purge:
    prefix = _field(prefix, "prefix")
    if not prefix.startswith("/"):
        raise PurgeError(f"a path prefix starts with /, got {prefix!r}")
    return Purge(prefix=prefix, host=_field(host, "host").lower() if host is not None else None)


def purge_key(host: str, path: str, query: bytes = b"") -> Purge:
    """One URI as the gateway keys it: the host as clients send it (with its port, if they send
    one), the path in the gateway's normal form, the query's parameters sorted."""
    host = _field(host, "host").lower()
    try:
        path = normalize_path(_field(path, "path"))
    except PathRefused as exc:
        raise PurgeError(f"the path cannot be a request's: {exc}") from None
    if not path.startswith("/"):
        raise PurgeError(f"a path starts with /, got {path!r}")
    return Purge(uri=(host, path, normalised_query(query)))


def purge_url(url: str) -> Purge:
    """``http://host[:port]/path?query`` as a ``purge_key``."""
    try:
        parts = urlsplit(_field(url, "url"))
    except ValueError as exc:
        raise PurgeError(f"not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.username or parts.password:
        raise PurgeError("expected a URL such as http://api.example.com/path?a=1 (http or https, a host)")
    try:
        query = parts.query.encode("latin-1")
    except UnicodeEncodeError:
        raise PurgeError("the query holds characters a request line cannot (encode them as %XX)") from None
    return purge_key(parts.netloc, parts.path or "/", query)


def parse_notice(data: Any) -> Purge:
    """The purge a notice (decoded JSON) names; PurgeError for anything else."""
    if not isinstance(data, dict) or len(data) not in (1, 2):
        raise PurgeError("a purge names exactly one of all, route, prefix (with host) or url")
    if data == {"all": True}:
        return purge_everything()
    if set(data) == {"route"} and isinstance(data["route"], str):
        return purge_route(data["route"])
    if set(data) <= {"prefix", "host"} and isinstance(data.get("prefix"), str):
        host = data.get("host")
        if host is not None and not isinstance(host, str):
            raise PurgeError("host must be a string or null")
        return purge_prefix(data["prefix"], host)
    if set(data) == {"url"}:
        url = data["url"]
        if isinstance(url, str):
            return purge_url(url)
        if isinstance(url, list) and len(url) == 3 and all(isinstance(part, str) for part in url):
            try:
                query = url[2].encode("latin-1")
            except UnicodeEncodeError:
                raise PurgeError("the query holds characters a request line cannot") from None
            return purge_key(url[0], url[1], query)
    raise PurgeError("a purge names exactly one of all, route, prefix (with host) or url")


def _field(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD_CHARS:
        raise PurgeError(f"{name} must be a string of 1 to {MAX_FIELD_CHARS} characters")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value):
        raise PurgeError(f"{name} holds a control character")
    return value


# -- this process ----------------------------------------------------------------------------------
def apply_purge(purge: Purge) -> int:
    """Drop what ``purge`` names from this process's stores; how many entries went."""
    removed = 0
    for store in all_stores():
        if purge.everything:
            removed += store.purge_all()
        elif purge.route is not None:
            removed += store.purge_route(purge.route)
        elif purge.prefix is not None:
            removed += store.purge_prefix(purge.prefix, purge.host)
        elif purge.uri is not None:
            host, path, query = purge.uri
            removed += store.purge_key(host, path, query)
    return removed


# -- Redis -----------------------------------------------------------------------------------------
async def purge_redis(state: StateBackend, purge: Purge) -> int:
    """Delete the entries ``purge`` names from Redis; how many went. ``state`` is a RedisState
    (its redis-py client reads the indexes)."""
    if purge.uri is not None:
        return await _remove_uris(state, [uri_tag(purge.uri)])
    client: Any = getattr(state, "client")  # noqa: B009 - RedisState's; other backends hold no entries
    routes_key = state.key(same_slot(ROUTES_TAG, ROUTES_NAME)[0])
    if purge.route is not None:
        return await _purge_route(state, client, routes_key, purge.route, None)
    routes = [member async for member, _score in client.zscan_iter(routes_key, count=BATCH)]
    removed = 0
    for raw in routes:
        route = raw.decode("utf-8", "surrogatepass") if isinstance(raw, bytes) else str(raw)
        if purge.prefix is not None:
            removed += await _purge_route(state, client, routes_key, route, purge)
        else:
            removed += await _purge_route(state, client, routes_key, route, None)
    if purge.everything:
        # URIs no route index lists any more (an index lost, a route renamed): every URI index.
        pattern = state.key("{*}:" + INDEX_NAME)
        tags: list[str] = []
        async for key in client.scan_iter(match=pattern, count=BATCH):
            text = key.decode("utf-8", "surrogatepass") if isinstance(key, bytes) else str(key)
            start, end = text.find("{"), text.rfind("}")
            if 0 <= start < end:
                tags.append(text[start + 1 : end])
            if len(tags) >= BATCH:
                removed += await _remove_uris(state, tags)
                tags = []
        removed += await _remove_uris(state, tags)
        await client.delete(routes_key)
    return removed


async def _purge_route(
    state: StateBackend, client: Any, routes_key: str, route: str, under: Purge | None
) -> int:
    """The URIs of ``route`` (those under ``under``'s prefix, when given) go from Redis."""
    index_key = state.key(same_slot(route_tag(route), ROUTE_INDEX_NAME)[0])
    removed = 0
    tags: list[str] = []
    members: list[Any] = []

    async def remove_batch() -> int:
        count = await _remove_uris(state, tags)
        if members:
            await client.zrem(index_key, *members)
        tags.clear()
        members.clear()
        return count

    async for member, _score in client.zscan_iter(index_key, count=BATCH):
        found = parse_index_member(member)
        if found is None:
            continue
        tag, (host, path, _query) = found
        if under is not None:
            assert under.prefix is not None
            if not path.startswith(under.prefix) or (under.host is not None and host != under.host):
                continue
            members.append(member)
        tags.append(tag)
        if len(tags) >= BATCH:
            removed += await remove_batch()
    removed += await remove_batch()
    if under is None:
        await client.delete(index_key)
        await client.zrem(routes_key, route)
    return removed


async def _remove_uris(state: StateBackend, tags: list[str]) -> int:
    """Every key of each URI (by its tag), one script each, sent together."""
    if not tags:
        return 0
    counts = await asyncio.gather(*(state.run(REMOVE_URI, same_slot(tag, INDEX_NAME)) for tag in set(tags)))
    return sum(int(count) for count in counts)


# -- everywhere --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Purged:
    here: int  # entries this process dropped
    redis: int  # entries deleted from Redis
    announced: bool  # the notice went out on Redis


async def purge(what: Purge, state: StateBackend | None) -> Purged:
    """Purge in this process and, with Redis as ``state`` (``state.url``'s), in Redis and in every
    worker of every node."""
    here = apply_purge(what)
    if state is None or not state.shared:
        return Purged(here, 0, False)
    removed = await purge_redis(state, what)
    await state.publish(PURGE_CHANNEL, orjson.dumps(what.notice()))
    return Purged(here, removed, True)


class PurgeListener:
    """This worker's subscription to purge notices, on the shared state backend."""

    def __init__(self) -> None:
        self.state: StateBackend | None = None
        self.subscription: Subscription | None = None
        self.received = 0
        self._task: asyncio.Task[None] | None = None
        self._refused_logged = False

    def listen(self, state: StateBackend | None) -> None:
        """Subscribe on ``state`` (once; a backend that is not shared carries no notices)."""
        if state is None or not state.shared or state is self.state:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # compiled outside a running gateway (a check): nothing to listen for
        self.state = state
        self._task = loop.create_task(self._subscribe(state), name="cache-purge-subscription")

    async def _subscribe(self, state: StateBackend) -> None:
        with contextlib.suppress(RuntimeError):  # the backend closed before the subscription began
            self.subscription = await state.subscribe(PURGE_CHANNEL, self.received_notice)

    def received_notice(self, message: Message) -> None:
        if message is None:
            # Subscribed again after a loss: notices sent meanwhile are lost, so the hot layer,
            # which is only copies of Redis, is dropped (the memory store keeps what it has).
            layer = current_layer()
            if layer is not None and self.subscription is not None and self.subscription.active:
                layer.purge_all()
            return
        self.received += 1
        try:
            if len(message) > MAX_NOTICE_BYTES:
                raise PurgeError(f"a notice is at most {MAX_NOTICE_BYTES} bytes")
            found = parse_notice(orjson.loads(message))
        except (PurgeError, orjson.JSONDecodeError) as exc:
            if not self._refused_logged:
                self._refused_logged = True
                log.warning("a cache purge notice was not understood and is ignored: %s", exc)
            return
        apply_purge(found)


PURGES: Final = PurgeListener()
