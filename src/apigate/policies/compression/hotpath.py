"""The `compression` policy's per-response work, kept free of pydantic so that mypyc can compile it.

Per response: one pass over the response head decides whether the body may be compressed at all
(no Content-Encoding yet, no Content-Range or 206, no ``no-transform``, a listed content type, not
known to be smaller than ``min_size``); the client's Accept-Encoding then picks the coding, read
once per distinct value and remembered. The encoder is the codec's streaming compressor, made by
a callable of the policy's module (the optional codecs' packages are imported there, not here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from apigate.engine.exchange import Exchange

# Distinct Accept-Encoding values remembered with their choice; past this many the memory starts again.
CHOICES_KEPT: Final = 1024
# Never compressed: each event must reach the client as it is sent, and a compressor holds bytes back.
_EVENT_STREAM: Final = b"text/event-stream"
_VARY_VALUE: Final = b"Accept-Encoding"
_CODING_ALIASES: Final[dict[bytes, bytes]] = {b"x-gzip": b"gzip"}


class Encoder:
    """The response body filter: a codec's streaming compressor (``feed`` and ``end``)."""

    __slots__ = ("compress", "finish")

    def __init__(self, compress: Callable[[bytes], bytes], finish: Callable[[], bytes]) -> None:
        self.compress = compress
        self.finish = finish

    def feed(self, chunk: bytes) -> bytes:
        out: bytes = self.compress(chunk)
        return out

    def end(self) -> bytes:
        out: bytes = self.finish()
        return out


class MediaTypes:
    """The content types to compress: exact (``application/json``), a whole top-level type
    (``text/*``), a structured-syntax suffix (``+json``), or anything (``*/*``)."""

    __slots__ = ("any", "exact", "suffixes", "tops")

    def __init__(self, patterns: list[str]) -> None:
        exact: set[bytes] = set()
        tops: set[bytes] = set()
        suffixes: list[bytes] = []
        matches_any = False
        for pattern in patterns:
            value = pattern.strip().lower().encode("latin-1")
            if value == b"*/*":
                matches_any = True
            elif value.startswith(b"+"):
                suffixes.append(value)
            elif value.endswith(b"/*"):
                tops.add(value[:-1])  # "text/"
            else:
                exact.add(value)
        self.any = matches_any
        self.exact = frozenset(exact)
        self.tops = frozenset(tops)
        self.suffixes = tuple(suffixes)

    def matches(self, content_type: bytes) -> bool:
        media = content_type.partition(b";")[0].strip().lower()
        if not media or media == _EVENT_STREAM:
            return False
        if self.any or media in self.exact:
            return True
        slash = media.find(b"/")
        if slash <= 0:
            return False
        return media[: slash + 1] in self.tops or media.endswith(self.suffixes)


def parse_qvalue(params: bytes) -> int:
    """The weight among a coding's parameters (``;q=0.5``) in thousandths: 1000 without one, -1
    when it is malformed (RFC 9110 §12.4.2: "0" to "1" with at most three decimals)."""
    for param in params.split(b";"):
        name, equals, value = param.partition(b"=")
        if not equals or name.strip().lower() != b"q":
            continue
        value = value.strip()
        if value == b"0" or value == b"1":
            return 1000 if value == b"1" else 0
        if len(value) > 5 or value[1:2] != b"." or not (value[:1] == b"0" or value[:1] == b"1"):
            return -1
        decimals = value[2:]
        if decimals and not decimals.isdigit():
            return -1
        if value[:1] == b"1":
            return -1 if decimals.strip(b"0") else 1000  # nothing above 1
        return int((decimals + b"000")[:3]) if decimals else 0
    return 1000


def weighted_items(value: bytes, aliases: dict[bytes, bytes]) -> dict[bytes, int]:
    """The items of a weighted list (Accept, Accept-Encoding: RFC 9110 §12.4.2), lowercase, with
    their weights in thousandths; an item named twice keeps its first weight (after ``aliases``
    renamed it), and one with a malformed weight counts as not named."""
    weights: dict[bytes, int] = {}
    for item in value.split(b","):
        name, _, params = item.partition(b";")
        name = name.strip().lower()
        if not name:
            continue
        weight = parse_qvalue(params) if params else 1000
        if weight < 0:
            continue
        name = aliases.get(name, name)
        if name not in weights:  # the first mention counts
            weights[name] = weight
    return weights


def choose_coding(accept_encoding: bytes, codings: tuple[bytes, ...]) -> bytes | None:
    """The coding (one of ``codings``, in the gateway's order of preference) that a client sending
    this Accept-Encoding accepts with the highest weight; None when it accepts none of them, or
    names ``identity`` with a higher weight (RFC 9110 §12.5.3). ``*`` stands for every coding it
    does not name, ``x-gzip`` for gzip; a coding with a malformed weight counts as not named."""
    weights = weighted_items(accept_encoding, _CODING_ALIASES)
    anything = weights.get(b"*", 0)
    best: bytes | None = None
    best_weight = 0
    for coding in codings:
        weight = weights.get(coding, anything)
        if weight > best_weight:
            best = coding
            best_weight = weight
    identity = weights.get(b"identity", -1)
    if best is None or identity > best_weight:
        return None
    return best


class Compression:
    """The policy's response_body hook, ``choose``: an Encoder for this response, or None."""

    __slots__ = ("choices", "codings", "encoders", "min_size", "types")

    def __init__(
        self,
        codings: tuple[bytes, ...],
        encoders: dict[bytes, Callable[[], Encoder]],
        types: MediaTypes,
        min_size: int,
    ) -> None:
        self.codings = codings  # in the gateway's order of preference
        self.encoders = encoders
        self.types = types
        self.min_size = min_size
        self.choices: dict[bytes, bytes | None] = {}

    def choose(self, exchange: Exchange) -> Any:
        if exchange.response_status == 206:
            return None
        headers = exchange.response_headers
        content_type: bytes | None = None
        length = -1
        for name, value in headers:
            if name == b"content-type":
                if content_type is None:
                    content_type = value
            elif name == b"content-length":
                length = int(value) if value.isdigit() else -1
            elif name == b"content-encoding" or name == b"content-range":
                return None  # already encoded, or a part of a representation
            elif name == b"cache-control" and b"no-transform" in value.lower():
                return None  # RFC 9111 §5.2.2.6: an intermediary must not transform the content
        if content_type is None or not self.types.matches(content_type):
            return None
        if length >= 0 and (length < self.min_size or length == 0):
            return None
        # From here the answer depends on the client's Accept-Encoding: caches must know (Vary).
        coding = self._coding_for(exchange.headers)
        if coding is None:
            exchange.response_headers = with_vary(headers, _VARY_VALUE)
            return None
        exchange.response_headers = _encoded_head(headers, coding)
        return self.encoders[coding]()

    def _coding_for(self, request_headers: list[tuple[bytes, bytes]]) -> bytes | None:
        accept: bytes | None = None
        for name, value in request_headers:
            if name == b"accept-encoding":
                accept = value if accept is None else accept + b"," + value
        if accept is None:
            return None  # no Accept-Encoding: the client is not known to decode anything
        choices = self.choices
        if accept in choices:
            return choices[accept]
        coding = choose_coding(accept, self.codings)
        if len(choices) >= CHOICES_KEPT:
            choices.clear()
        choices[accept] = coding
        return coding


def _encoded_head(headers: list[tuple[bytes, bytes]], coding: bytes) -> list[tuple[bytes, bytes]]:
    """The response head of the compressed body: no Content-Length (the client gets it chunked) and
    no Accept-Ranges (ranges of the compressed body are not served), a strong ETag made weak (the
    bytes differ, RFC 9110 §8.8.1), Content-Encoding, and Vary naming Accept-Encoding."""
    out: list[tuple[bytes, bytes]] = []
    for pair in headers:
        name = pair[0]
        if name == b"content-length" or name == b"accept-ranges":
            continue
        if name == b"etag" and pair[1][:2] != b"W/":
            out.append((b"etag", b"W/" + pair[1]))
            continue
        out.append(pair)
    out.append((b"content-encoding", coding))
    return with_vary(out, _VARY_VALUE)


def with_vary(headers: list[tuple[bytes, bytes]], field: bytes) -> list[tuple[bytes, bytes]]:
    """``headers`` (edited in place) with ``field`` (a request field's name) in Vary: added to the
    first Vary field, or a new one; left as they are when Vary already names it or is ``*``."""
    wanted = field.lower()
    first = -1
    for index in range(len(headers)):
        name, value = headers[index]
        if name != b"vary":
            continue
        for token in value.split(b","):
            token = token.strip()
            if token == b"*" or token.lower() == wanted:
                return headers
        if first < 0:
            first = index
    if first < 0:
        headers.append((b"vary", field))
    else:
        headers[first] = (b"vary", headers[first][1] + b", " + field)
    return headers
