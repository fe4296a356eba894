"""Bodies through the JSON mapping, one code path for requests and responses.

``BodyMapper`` reads a body, runs the compiled mapping (jsonmap.py) and writes the result as
JSON, or as XML for a client that asked for it (xmlmap.py), and says which outcome it was
(counts.py's slots). ``ResponseFilter`` is the response_body filter: it holds the body up to its
limit, then maps it in ``end()``; past the limit it gives up and lets the body through as it
came. Its hook asked the engine to hold the head (``Exchange.hold_head``), so the head goes
with the body it describes: the mapped body with its exact Content-Length, its new type and a
weakened ETag, or, when nothing changed, the upstream's own head untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from apigate.policies.compression.hotpath import with_vary
from apigate.policies.transform.counts import MAPPED, SLOTS, TOO_LARGE, UNCHANGED, XML
from apigate.policies.transform.jsonmap import JsonMapping, NotMapped, dump_json, load_json
from apigate.policies.transform.xmlmap import document_of, xml_of

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

# Fields that describe the upstream's bytes and are wrong for a changed body: ranges of it are
# not served, and digests of it (RFC 9530's Content-Digest and Repr-Digest, Content-MD5) no
# longer match. Content-Length goes too (the engine writes the new one).
_OF_THE_BYTES: Final = frozenset(
    {b"content-length", b"accept-ranges", b"content-digest", b"repr-digest", b"content-md5"}
)


def is_json(content_type: bytes | None) -> bool:
    """``application/json`` or ``application/<anything>+json``, whatever its parameters."""
    if content_type is None:
        return False
    media = content_type.partition(b";")[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class BodyMapper:
    """The route's compiled mapping in one direction (None: convert only)."""

    __slots__ = ("mapping",)

    def __init__(self, mapping: JsonMapping | None) -> None:
        self.mapping = mapping if mapping is not None and not mapping.empty else None

    def json_body(self, body: bytes, xml_root: str | None = None) -> tuple[int, bytes | None]:
        """The outcome's slot and the bytes to send instead (None: the body goes as it came).
        With ``xml_root`` the mapped document is written as XML in that root element."""
        try:
            if xml_root is not None:
                document, _ = load_json(body)
                if self.mapping is not None:
                    self.mapping.apply(document)
                return XML, xml_of(document, xml_root)
            if self.mapping is None:
                load_json(body)  # read all the same: a malformed body is counted as one
                return UNCHANGED, None
            mapped = self.mapping.map_body(body)
            return (UNCHANGED, None) if mapped is None else (MAPPED, mapped)
        except NotMapped as exc:
            return SLOTS[exc.reason], None

    def xml_body(self, body: bytes) -> bytes:
        """An XML body as the mapped JSON document; xmlmap.XmlRefused says why it cannot be."""
        document = document_of(body)
        if self.mapping is not None:
            self.mapping.apply(document)
        return dump_json(document)  # XML nests at most MAX_DEPTH: never too deep to write


class ResponseFilter:
    """One response's body, held whole up to ``limit`` and mapped at its end."""

    __slots__ = ("counts", "exchange", "held", "limit", "mapper", "passing", "root", "size", "xml_type")

    def __init__(
        self,
        exchange: Exchange,
        mapper: BodyMapper,
        counts: list[int],
        limit: int,
        xml_type: bytes | None,
        root: str,
    ) -> None:
        self.exchange = exchange
        self.mapper = mapper
        self.counts = counts
        self.limit = limit
        self.xml_type = xml_type  # the XML type to answer with; None: JSON stays JSON
        self.root = root
        self.held: list[bytes] = []
        self.size = 0
        self.passing = False

    def feed(self, chunk: bytes) -> bytes:
        if self.passing:
            return chunk
        size = self.size + len(chunk)
        if size > self.limit:
            # Too large to map: what was held goes now, then each piece as it comes. The head
            # was not touched, so it still describes these bytes.
            self.passing = True
            self.counts[TOO_LARGE] += 1
            held = b"".join(self.held) + chunk
            self.held = []
            return held
        self.size = size
        self.held.append(chunk)
        return b""

    def end(self) -> bytes:
        if self.passing:
            return b""
        body = b"".join(self.held)
        self.held = []
        if not body:
            return b""  # nothing to map, nothing to count
        slot, out = self.mapper.json_body(body, self.root if self.xml_type is not None else None)
        self.counts[slot] += 1
        if out is None:
            return body
        exchange = self.exchange
        exchange.response_headers = changed_head(exchange.response_headers, self.xml_type)
        return out


def changed_head(headers: list[tuple[bytes, bytes]], xml_type: bytes | None) -> list[tuple[bytes, bytes]]:
    """The head of a changed body: the fields of the old bytes dropped; as XML, its type and no
    ETag (the XML is another representation, which the upstream's validator does not name); as
    JSON, a strong ETag made weak (RFC 9110 §8.8.1: the bytes differ, the meaning does not)."""
    out: list[tuple[bytes, bytes]] = []
    for pair in headers:
        name = pair[0]
        if name in _OF_THE_BYTES:
            continue
        if name == b"etag":
            if xml_type is not None:
                continue
            if pair[1][:2] != b"W/":
                pair = (b"etag", b"W/" + pair[1])
        elif name == b"content-type" and xml_type is not None:
            pair = (b"content-type", xml_type + b"; charset=utf-8")
        out.append(pair)
    return out


def with_vary_accept(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with Accept in Vary (the body's form depends on it), as compression names
    Accept-Encoding."""
    return with_vary(headers, b"Accept")


def content_fields(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, int, bool, bool]:
    """What a response head says of its body, in one pass: (Content-Type, Content-Length or -1,
    encoded (a Content-Encoding other than identity), partial (a Content-Range))."""
    content_type: bytes | None = None
    length = -1
    encoded = partial = False
    for name, value in headers:
        if name == b"content-type":
            if content_type is None:
                content_type = value
        elif name == b"content-length":
            length = int(value) if value.isdigit() else -1
        elif name == b"content-encoding":
            encoded = encoded or value.strip().lower() != b"identity"
        elif name == b"content-range":
            partial = True
    return content_type, length, encoded, partial


__all__ = [
    "BodyMapper",
    "ResponseFilter",
    "changed_head",
    "content_fields",
    "is_json",
    "with_vary_accept",
]
