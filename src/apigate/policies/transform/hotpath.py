"""The per-request work of `transform` and `headers`, kept free of pydantic so that mypyc can compile it.

What the config says arrives as plain values, compiled once (``policies/transform/build.py``):
header and query names as lowercase or percent-encoded bytes, values as ``Template``s (literal
bytes and getters, so a request never parses a template), the path rewrite as a compiled
pattern and its pieces.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import quote_from_bytes, unquote_to_bytes

from mypy_extensions import i64

from apigate.engine.exchange import Exchange
from apigate.engine.paths import PathRefused, normalize_path

Getter = Callable[[Exchange], bytes | None]

_DOT_SEGMENT: Final = re.compile(r"(?:^|/)\.\.?(?:/|$)")


# -- variables ------------------------------------------------------------------------------------------
def consumer_id(exchange: Exchange) -> bytes | None:
    found = exchange.consumer_id()
    return found.encode() if found else None


def tenant(exchange: Exchange) -> bytes | None:
    found = exchange.tenant
    return found.encode() if found else None


def request_id(exchange: Exchange) -> bytes | None:
    return exchange.rid


def client_ip(exchange: Exchange) -> bytes | None:
    return exchange.client_ip.encode()


class Claim:
    """A claim of the verified token (jwt, oauth2-introspection put them in ``vars()["claims"]``)."""

    __slots__ = ("name", "text")

    def __init__(self, name: str, text: Callable[[Any], str | None]) -> None:
        self.name = name
        self.text = text  # a claim's value as text (policies/claims.py's claim_text)

    def get(self, exchange: Exchange) -> bytes | None:
        state = exchange.state
        if state is None:
            return None
        claims = state.get("claims")
        if claims is None:
            return None
        found = self.text(claims.get(self.name))
        return found.encode() if found else None


class Template:
    """A value with variables: ``literals[i]`` comes before ``getters[i]``, the last literal after
    the last getter. A variable with no value (no consumer, no such claim) or an unsafe one makes
    the whole value None: the header or parameter is then not added."""

    __slots__ = ("getters", "literals", "static")

    def __init__(self, literals: list[bytes], getters: list[Getter]) -> None:
        self.literals = literals
        self.getters = getters
        self.static: bytes | None = literals[0] if not getters else None

    def render(self, exchange: Exchange) -> bytes | None:
        static = self.static
        if static is not None:
            return static
        literals = self.literals
        getters = self.getters
        if len(getters) == 1:  # the usual template: one variable, maybe with text around it
            value = getters[0](exchange)
            if not value or not field_safe(value):
                return None
            before = literals[0]
            after = literals[1]
            if before:
                value = before + value
            return value + after if after else value
        out = [literals[0]]
        index = 1
        for get in getters:
            value = get(exchange)
            if not value or not field_safe(value):
                return None
            out.append(value)
            out.append(literals[index])
            index += 1
        return b"".join(out)


def field_safe(value: bytes) -> bool:
    """Whether ``value`` may stand in a field value: no control character but HTAB (RFC 9110
    §5.5). A variable's value holding one (CR or LF would start a header of its own) is dropped,
    never sent. A byte loop: compiled, it costs a tenth of a regular expression's search."""
    size: i64 = len(value)
    index: i64 = 0
    while index < size:
        byte: i64 = value[index]
        if (byte < 32 and byte != 9) or byte == 127:
            return False
        index += 1
    return True


# -- headers ---------------------------------------------------------------------------------------------
class CompiledEdits:
    """One direction's header edits: remove → rename → set → add, applied to a header list at once.
    Names come lowercase; ``set`` is "drop every old value, then append", ``add`` only appends."""

    __slots__ = ("appended", "drop", "empty", "rename", "values")

    def __init__(
        self,
        remove: list[bytes],
        rename: dict[bytes, bytes],
        set: list[tuple[bytes, Template]],
        add: list[tuple[bytes, Template]],
    ) -> None:
        self.rename = rename
        self.values: list[tuple[bytes, Template]] = set + add
        self.drop: frozenset[bytes] = frozenset(remove) | {name for name, _ in set}
        # Values without variables are appended as they are: no rendering per request.
        fixed: list[tuple[bytes, bytes]] = []
        for name, template in self.values:
            if template.static is not None:
                fixed.append((name, template.static))
        self.appended: list[tuple[bytes, bytes]] | None = fixed if len(fixed) == len(self.values) else None
        self.empty: bool = not (self.rename or self.values or self.drop)

    def apply(self, headers: list[tuple[bytes, bytes]], exchange: Exchange) -> list[tuple[bytes, bytes]]:
        """``headers`` edited: in place (and returned) when none of them is removed or renamed,
        the usual case, else a new list."""
        drop = self.drop
        rename = self.rename
        if drop or rename:
            # One look at each name; the list is rebuilt only when one of them goes or changes.
            for pair in headers:
                name = pair[0]
                if name in drop or name in rename:
                    headers = self._rebuilt(headers)
                    break
        appended = self.appended
        if appended is not None:
            if appended:
                headers += appended
        else:
            for name, template in self.values:
                value = template.render(exchange)
                if value is not None:
                    headers.append((name, value))
        return headers

    def _rebuilt(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        drop = self.drop
        if self.rename:
            rename = self.rename
            return [(rename.get(name, name), value) for name, value in headers if name not in drop]
        return [pair for pair in headers if pair[0] not in drop]

    # The hooks themselves: the policies hand these bound methods to the engine.
    def edit_request(self, exchange: Exchange) -> None:
        if not self.empty:
            exchange.headers = self.apply(exchange.headers, exchange)

    def edit_response(self, exchange: Exchange) -> None:
        if not self.empty:
            exchange.response_headers = self.apply(exchange.response_headers, exchange)


# -- query -----------------------------------------------------------------------------------------------
class CompiledQuery:
    """Query parameter edits: remove → rename → set → add. Parameters are matched by their decoded
    name (``%61pi_key`` and ``api+key`` are ``api_key`` and ``api key``, as the upstream reads them);
    untouched ones go on exactly as sent; added names and values are percent-encoded."""

    __slots__ = ("drop", "rename", "values")

    def __init__(
        self, drop: frozenset[bytes], rename: dict[bytes, bytes], values: list[tuple[bytes, Template]]
    ) -> None:
        """``drop`` (what ``remove`` and ``set`` take away) and the keys of ``rename``: decoded names
        (UTF-8); ``rename``'s new names and the names of ``values`` (``set``, then ``add``): encoded."""
        self.drop = drop
        self.rename = rename
        self.values = values

    def apply(self, query: bytes, exchange: Exchange) -> bytes:
        changed = False
        parts: list[bytes] = []
        if query:
            drop = self.drop
            rename = self.rename
            for part in query.split(b"&"):
                raw, equals, value = part.partition(b"=")
                name = unquote_to_bytes(raw.replace(b"+", b" ")) if b"%" in raw or b"+" in raw else raw
                if name in drop:
                    changed = True
                    continue
                renamed = rename.get(name)
                if renamed is not None:
                    part = renamed + equals + value
                    changed = True
                parts.append(part)
        for name, template in self.values:
            rendered = template.render(exchange)
            if rendered is not None:
                parts.append(name + b"=" + quote_from_bytes(rendered, "").encode("ascii"))
                changed = True
        return b"&".join(parts) if changed else query


# -- path ------------------------------------------------------------------------------------------------
class CompiledPath:
    """The first match of ``pattern`` in the path the route would send upstream is replaced by
    ``pieces`` (literal text, or the number of a group whose text goes there). The result must be
    an origin-form path in normal form without dot segments; else ``refuse`` answers."""

    __slots__ = ("pattern", "pieces", "refuse")

    def __init__(
        self,
        pattern: re.Pattern[str],
        pieces: list[tuple[int, str]],
        refuse: Callable[[Exchange], Any],
    ) -> None:
        self.pattern = pattern
        self.pieces = pieces  # (group, "") for a group's text, (-1, text) for literal text
        self.refuse = refuse

    def apply(self, exchange: Exchange) -> Any:
        current = exchange.rewritten_path
        if current is None:
            route = exchange.route
            if route is not None and (route.rewrite is not None or route.prefix_strip):
                current = route.upstream_path(
                    exchange.path, exchange.params, exchange.remainder, exchange.prefix
                )
            else:
                current = exchange.path
        match = self.pattern.search(current)
        if match is None:
            return None
        out = [current[: match.start()]]
        for group, text in self.pieces:
            if group < 0:
                out.append(text)
            else:
                out.append(match.group(group) or "")
        out.append(current[match.end() :])
        rewritten = origin_form("".join(out))
        if rewritten is None:
            return self.refuse(exchange)
        exchange.rewritten_path = rewritten
        return None


def origin_form(path: str) -> str | None:
    """``path`` in normal form (engine/paths.py), or None when it is no origin-form path: not
    starting with "/", with a space or control character, a malformed escape, or a dot segment
    (which would climb out of where the rewrite put it)."""
    if path[:1] != "/" or " " in path:
        return None
    try:
        normal = normalize_path(path)
    except PathRefused:
        return None
    if normal != path and _DOT_SEGMENT.search(path.replace("%2E", ".").replace("%2e", ".")) is not None:
        return None
    return normal


# -- the request hook ------------------------------------------------------------------------------------
class CompiledRequest:
    """The request side: the path first (it may refuse), then the query, then the headers."""

    __slots__ = ("headers", "path", "query")

    def __init__(
        self, path: CompiledPath | None, query: CompiledQuery | None, headers: CompiledEdits | None
    ) -> None:
        self.path = path
        self.query = query
        self.headers = headers

    def edit(self, exchange: Exchange) -> Any:
        path = self.path
        if path is not None:
            refused = path.apply(exchange)
            if refused is not None:
                return refused
        query = self.query
        if query is not None:
            exchange.query = query.apply(exchange.query, exchange)
        headers = self.headers
        if headers is not None and not headers.empty:
            exchange.headers = headers.apply(exchange.headers, exchange)
        return None
