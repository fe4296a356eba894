"""Route matching: from (method, path, host, headers) to the compiled route that serves it.

Path patterns
-------------
- **Exact**: ``/a/b`` matches only ``/a/b``. A trailing slash is significant: ``/a/b/`` is a
  different path.
- **Templated**: ``/users/{id}/orders/{oid}``. A parameter matches exactly one non-empty path
  segment; its value is returned in ``params`` (``{"id": "7", "oid": "42"}``) as the path has
  it (the caller passes the normal form of engine/paths.py: only unreserved escapes decoded).
- **Prefix**: ``/api/v1/*`` matches ``/api/v1``, ``/api/v1/`` and anything under ``/api/v1/``,
  but never ``/api/v1x``. ``/*`` matches every path. A prefix may contain parameters
  (``/t/{tenant}/*``). The match reports ``prefix``, the matched part without trailing slash
  (``/api/v1``, or ``""`` for ``/*``), and ``remainder``, what the ``*`` covered, always starting
  with ``/`` (``/`` when nothing is left): ``/api/v1/users/7`` gives prefix ``/api/v1`` and
  remainder ``/users/7``.
- **Path parameters**: a literal segment matches a request segment up to its first ``;``
  (``/users/me`` matches ``/users/me;v=1``), as servlet containers map paths.

Conditions
----------
- **host**: a list of names; ``api.example.com`` matches that host only, ``*.example.com``
  matches ``a.example.com`` and ``a.b.example.com`` but not ``example.com``. The request's
  ``Host`` is compared case-insensitively, with any ``:port`` (and a trailing dot) ignored; a
  port written in the condition is ignored too. A request without ``Host`` matches no host
  condition. No host condition = any host.
- **headers**: ``name: value`` requires a header with exactly that value (case-sensitive,
  any of several same-named headers may match); ``name: "*"`` only requires the header to be
  present. Names are case-insensitive.
- **methods**: a list of methods; none = any method. ``HEAD`` is not implied by ``GET``.

Precedence: most specific wins, then declared order
---------------------------------------------------
Every route that matches the path is a candidate. Candidates are ranked by:

1. **Path**: exact beats templated beats prefix.

   - Among templated patterns, segments are compared from the left: at the first position
     where they differ, a static segment beats a parameter (``/users/me`` > ``/users/{id}``,
     ``/a/{x}/c`` > ``/{y}/b/c``).
   - Among prefixes, the longer prefix (more segments) wins (``/api/v1/*`` > ``/api/*`` >
     ``/*``); at equal length a static segment beats a parameter as above.

2. **Conditions**, for routes whose paths are equally specific: an exact host beats a
   wildcard host (a longer wildcard such as ``*.eu.example.com`` beats ``*.example.com``),
   which beats no host condition; then more header conditions beat fewer; then a method
   condition beats none. A route listing several hosts ranks by the host the request matched.
3. **Declared order**.

The first candidate, in this order, whose host, headers and method all match serves the
request. If none does but some candidate matched everything except the method, the answer is
``405 Method Not Allowed`` with ``Allow`` set to the union of those candidates' methods.
Otherwise the answer is ``404``.

Cost
----
Exact paths are one dict lookup; templated and prefix patterns live in a segment trie walked
once per lookup, so lookups do not grow with the number of routes. The candidate list of a path
(which depends on the path only) is cached in a bounded dict; host, header and method
conditions are checked on every request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["MethodNotAllowed", "RouteEntry", "RouteMatch", "Router"]


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """One route as the router sees it; ``payload`` is opaque (the compiled route)."""

    path: str
    payload: Any
    hosts: tuple[str, ...] = ()
    methods: frozenset[str] | None = None
    headers: tuple[tuple[bytes, bytes | None], ...] = ()
    order: int = 0


class RouteMatch:
    """A successful match; a fresh object (and ``params`` dict) on every call."""

    # A plain class rather than a dataclass: made once per request, and compiled, its own
    # __init__ is several times cheaper than the one dataclass generates.
    __slots__ = ("params", "payload", "prefix", "remainder")

    def __init__(
        self, payload: Any, params: dict[str, str], remainder: str | None, prefix: str | None
    ) -> None:
        self.payload = payload
        self.params = params
        self.remainder = remainder
        self.prefix = prefix

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RouteMatch) and (
            (self.payload, self.params, self.remainder, self.prefix)
            == (other.payload, other.params, other.remainder, other.prefix)
        )

    def __repr__(self) -> str:
        return f"RouteMatch({self.payload!r}, {self.params!r}, {self.remainder!r}, {self.prefix!r})"


@dataclass(frozen=True, slots=True)
class MethodNotAllowed:
    """Returned (not raised) when only the method kept routes from matching."""

    allowed: tuple[str, ...]


# A variant is one (entry, host) pair: an entry with several hosts ranks differently depending on
# which host matched, so each host gets its own, statically ranked, variant.
# Layout (a tuple, unpacked in the hot loop): host_kind, host_value, exact_headers,
# present_headers, methods, payload, params_slot. params_slot indexes the group's params table:
# same-shape patterns (/u/{id}, /u/{name}) share a trie node but name their params differently.
_ANY_HOST, _EXACT_HOST, _WILDCARD_HOST = 0, 1, 2
_Variant = tuple[
    int,
    str,
    tuple[tuple[bytes, bytes], ...],
    tuple[bytes, ...],
    frozenset[str] | None,
    object,
    int,
]
# A group: the variants of one path pattern shape plus what the path gave them:
# (variants, params_table, remainder, prefix). A match copies a prebuilt params dict, which is
# several times cheaper than dict(zip(names, values)) per request.
_Group = tuple[tuple[_Variant, ...], tuple[dict[str, str], ...], str | None, str | None]
_NO_PARAMS: Final[tuple[dict[str, str], ...]] = ({},)


class _Node:
    __slots__ = ("param", "prefix", "prefix_names", "static", "terminal", "terminal_names")

    def __init__(self) -> None:
        self.static: dict[str, _Node] = {}
        self.param: _Node | None = None
        # Variants whose templated pattern ends here / whose prefix pattern ends here. Lists
        # while building, sorted tuples afterwards.
        self.terminal: Any = []
        self.prefix: Any = []
        # Distinct param-name tuples of those variants, indexed by their params_slot.
        self.terminal_names: tuple[tuple[str, ...], ...] = ()
        self.prefix_names: tuple[tuple[str, ...], ...] = ()


def _normalize_host(host: str) -> str:
    host = host.lower()
    if host.startswith("["):  # IPv6 literal: the port follows the bracket
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    if ":" in host:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _segment_kind(segment: str) -> str | None:
    """The parameter name if the segment is ``{name}``, else None (static)."""
    if len(segment) > 2 and segment[0] == "{" and segment[-1] == "}":
        return segment[1:-1]
    if "{" in segment or "}" in segment or "*" in segment:
        raise ValueError(f"invalid path segment {segment!r}")
    return None


class Router:
    """Matches requests against a fixed route table; build a new Router to change routes."""

    def __init__(self, entries: Iterable[RouteEntry], cache_size: int = 4096) -> None:
        self._exact: dict[str, _Group] = {}
        self._root = _Node()
        self._cache: dict[str, tuple[_Group, ...]] = {}
        self._cache_size = max(0, cache_size)
        self._uses_trie = False
        exact_variants: dict[str, list] = {}

        for index, entry in enumerate(entries):
            path = entry.path
            if not path.startswith("/"):
                raise ValueError(f"route path {path!r} must start with /")
            is_prefix = path == "/*" or path.endswith("/*")
            segments = (path[:-2] if is_prefix else path).split("/")[1:]
            kinds = [_segment_kind(s) for s in segments]
            names = tuple(k for k in kinds if k is not None)
            variants = list(self._variants(entry, index, names))

            if not is_prefix and not names:
                exact_variants.setdefault(path, []).extend(variants)
                continue
            self._uses_trie = True
            node = self._root
            for segment, kind in zip(segments, kinds, strict=True):
                if kind is None:
                    node = node.static.setdefault(segment, _Node())
                else:
                    if node.param is None:
                        node.param = _Node()
                    node = node.param
            (node.prefix if is_prefix else node.terminal).extend(variants)

        for path, keyed in exact_variants.items():
            self._exact[path] = (_ranked(keyed)[0], _NO_PARAMS, None, None)
        self._freeze(self._root)

    @staticmethod
    def _variants(entry: RouteEntry, index: int, names: tuple[str, ...]) -> Iterable[tuple[tuple, tuple]]:
        exact = tuple((name.lower(), value) for name, value in entry.headers if value is not None)
        present = tuple(name.lower() for name, value in entry.headers if value is None)
        methods = frozenset(entry.methods) if entry.methods is not None else None
        # Ranking within one path shape: host, then header count, then methods, then order.
        tail = (-len(entry.headers), 0 if methods is not None else 1, entry.order, index)
        if not entry.hosts:
            yield (2, 0, *tail), (_ANY_HOST, "", exact, present, methods, entry.payload, names)
        for raw in dict.fromkeys(entry.hosts):
            host = _normalize_host(raw)
            if host.startswith("*."):
                suffix = host[1:]  # ".example.com": the dot keeps "example.com" itself out
                key = (1, -len(suffix), *tail)
                yield key, (_WILDCARD_HOST, suffix, exact, present, methods, entry.payload, names)
            else:
                yield (0, 0, *tail), (_EXACT_HOST, host, exact, present, methods, entry.payload, names)

    def _freeze(self, node: _Node) -> None:
        node.terminal, node.terminal_names = _ranked(node.terminal)
        node.prefix, node.prefix_names = _ranked(node.prefix)
        for child in node.static.values():
            self._freeze(child)
        if node.param is not None:
            self._freeze(node.param)

    def _lookup(self, path: str) -> tuple[_Group, ...]:
        """All candidate groups for a path, best first (path specificity only)."""
        groups: list[_Group] = []
        # Servlet containers and Spring strip path parameters ("users;v=1", RFC 3986 §3.3) from
        # each segment before they map a path, so literal segments are compared without them:
        # the route chosen is the one such an upstream's own mapping agrees with. Parameter
        # values, prefix and remainder keep them, as sent.
        key = _without_path_parameters(path) if ";" in path else path
        exact = self._exact.get(key)
        if exact is not None:
            groups.append(exact)
        if not self._uses_trie:
            return tuple(groups)

        segments = path.split("/")
        names = segments if key is path else key.split("/")
        count = len(segments)
        templated: list[_Group] = []
        prefixes: list[tuple[int, _Group]] = []
        values: list[str] = []

        def walk(node: _Node, i: int) -> None:
            # Static child before param child: the walk then meets patterns in precedence order
            # (static beats param at the first differing segment).
            if node.prefix:
                # segments[0] is the empty string before the first "/".
                prefix = "/".join(segments[:i]) if i > 1 else ""
                remainder = path[len(prefix) :] or "/"
                params = _params_table(node.prefix_names, values)
                prefixes.append((i, (node.prefix, params, remainder, prefix)))
            if i == count:
                if node.terminal:
                    templated.append((node.terminal, _params_table(node.terminal_names, values), None, None))
                return
            name = names[i]
            child = node.static.get(name)
            if child is not None:
                walk(child, i + 1)
            if node.param is not None and name:
                values.append(segments[i])
                walk(node.param, i + 1)
                values.pop()

        walk(self._root, 1)
        groups.extend(templated)
        # Longer prefixes first; the sort is stable, so equal lengths keep the walk's order.
        prefixes.sort(key=_first, reverse=True)
        groups.extend(group for _, group in prefixes)
        return tuple(groups)

    def match(
        self, method: str, path: str, host: str | None, headers: list[tuple[bytes, bytes]]
    ) -> RouteMatch | MethodNotAllowed | None:
        groups = self._cache.get(path)
        if groups is None:
            groups = self._lookup(path)
            if self._cache_size:
                cache = self._cache
                if len(cache) >= self._cache_size:
                    cache.clear()  # cheaper than LRU bookkeeping on the hot path
                cache[path] = groups
        if not groups:
            return None

        request_host: str | None = None  # normalized lazily: most routes have no host condition
        allowed: frozenset[str] | None = None
        for variants, params, remainder, prefix in groups:
            for host_kind, host_value, exact, present, methods, payload, slot in variants:
                if host_kind:
                    if request_host is None:
                        request_host = _normalize_host(host) if host else ""
                    if host_kind == _EXACT_HOST:
                        if request_host != host_value:
                            continue
                    elif len(request_host) <= len(host_value) or not request_host.endswith(host_value):
                        continue
                if exact and not _all_equal(exact, headers):
                    continue
                if present and not _all_present(present, headers):
                    continue
                if methods is not None and method not in methods:
                    allowed = methods if allowed is None else allowed | methods
                    continue
                # A copy: the caller may edit params, the cached table must not change.
                return RouteMatch(payload, params[slot].copy(), remainder, prefix)
        if allowed:  # an empty methods set allows nothing: that is a 404, not a 405 with no Allow
            return MethodNotAllowed(tuple(sorted(allowed)))
        return None


def _ranked(keyed: list | tuple) -> tuple[tuple[_Variant, ...], tuple[tuple[str, ...], ...]]:
    """Variants sorted by rank, with their param names swapped for a slot in a names table."""
    slots: dict[tuple[str, ...], int] = {}
    variants = []
    for _, variant in sorted(keyed, key=_first):
        slot = slots.setdefault(variant[-1], len(slots))
        variants.append((*variant[:-1], slot))
    return tuple(variants), tuple(slots)


def _params_table(names_table: tuple[tuple[str, ...], ...], values: list[str]) -> tuple[dict[str, str], ...]:
    if len(names_table) == 1:  # the usual case; skips the generator on every cache miss
        return (dict(zip(names_table[0], values, strict=True)),)
    return tuple(dict(zip(names, values, strict=True)) for names in names_table)


def _without_path_parameters(path: str) -> str:
    return "/".join(segment.partition(";")[0] for segment in path.split("/"))


def _first(item: tuple[Any, ...]) -> Any:
    return item[0]


def _all_equal(pairs: tuple[tuple[bytes, bytes], ...], headers: list[tuple[bytes, bytes]]) -> bool:
    # Tuple equality runs in C; any of several same-named headers may match.
    return all(pair in headers for pair in pairs)


def _all_present(names: tuple[bytes, ...], headers: list[tuple[bytes, bytes]]) -> bool:
    for name in names:
        for header_name, _ in headers:
            if header_name == name:
                break
        else:
            return False
    return True
