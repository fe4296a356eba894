"""JSON documents as XML and back, by one fixed mapping, and which of the two a client asks for.

JSON → XML (``xml_of``): the document goes inside one root element (its name configured):

- an object's fields become elements named as their keys, in order;
- an array becomes one element per item, each named as the array's key (an array in an array:
  an element of that name holding ``item`` elements; an array at the root: ``item`` elements);
  an empty array writes nothing;
- a string is the element's text, escaped (``&``, ``<``, ``>``, CR as ``&#13;``); characters
  XML 1.0 cannot carry at all (control characters other than tab, LF and CR, lone surrogates,
  U+FFFE and U+FFFF) become U+FFFD;
- a number is its JSON text, ``true`` and ``false`` as written, ``null`` an empty element;
- no attribute is ever written, and no namespace.

A key that is not a portable XML name is encoded as .NET's XmlConvert.EncodeName does: each
character a name cannot hold (or cannot start with) becomes ``_xHHHH_`` (its code point in hex,
eight digits beyond U+FFFF), an empty key is ``_``, and a literal ``_x`` that would read as
such an escape has its ``_`` written ``_x005F_``. Names are kept to what every XML 1.0 parser
takes: ASCII letters, digits, ``_``, ``-``, ``.``, and the Latin letters U+00C0 to U+017E that
the XML 1.0 name classes include (so ``żółw`` stays ``żółw``); no ``:``.

XML → JSON (``document_of``), the reverse: the root element's content is the document (its own
name is dropped). An element holding elements is an object of them; names seen more than once
in one element become an array (in order); an element holding text only is that string (as
written: no number or boolean is guessed); an empty element is ``null``. ``_xHHHH_`` escapes in
names are decoded. What has no place in that mapping is refused rather than dropped: attributes,
text beside elements (mixed content), nesting deeper than ``MAX_DEPTH``. Namespaces are read
by local name. Parsing is defusedxml's, with DTDs, entity declarations and external references
forbidden: a billion-laughs document is refused at its ``<!DOCTYPE``, never expanded.
"""

from __future__ import annotations

import re
from typing import Any, Final
from xml.etree.ElementTree import ParseError

from defusedxml import DefusedXmlException, DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden
from defusedxml.ElementTree import DefusedXMLParser

from apigate.policies.compression.hotpath import weighted_items

__all__ = ["MAX_DEPTH", "XmlRefused", "document_of", "is_xml", "prefers_xml", "xml_name", "xml_of"]

MAX_DEPTH: Final = 128  # elements within elements, root included (JSON is written up to 254)
DECLARATION: Final = b'<?xml version="1.0" encoding="UTF-8"?>'
# Name characters every XML 1.0 parser takes (expat keeps the first edition's classes): ASCII, and
# the Latin-1 and Latin Extended-A letters of XML 1.0 Appendix B.
_LATIN: Final = "\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u0131\u0134-\u013e\u0141-\u0148\u014a-\u017e"
_START: Final = re.compile(f"[A-Za-z_{_LATIN}]")
_NAME_CHAR: Final = re.compile(f"[A-Za-z0-9_.\\-\u00b7{_LATIN}]")
_PORTABLE: Final = re.compile(f"[A-Za-z_{_LATIN}][A-Za-z0-9_.\\-\u00b7{_LATIN}]*")
_ESCAPE_LIKE: Final = re.compile(r"_x[0-9A-Fa-f]{4}_|_x[0-9A-Fa-f]{8}_")
_ESCAPED: Final = re.compile(r"_x([0-9A-Fa-f]{8}|[0-9A-Fa-f]{4})_")
# What XML 1.0 text cannot hold, even as a character reference (its Char production).
_NOT_XML: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_TEXT_ESCAPES: Final = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})
_XML_TYPES: Final = (b"application/xml", b"text/xml")
_MISSING: Final = object()
_NO_ALIASES: Final[dict[bytes, bytes]] = {}


class XmlRefused(ValueError):
    """XML the gateway will not turn into JSON: ``reason`` is a short token (``xml_dtd``,
    ``xml_entities``, ``xml_external``, ``xml_malformed``, ``xml_attributes``, ``xml_mixed``,
    ``xml_too_deep``), the message says what is wrong without quoting the document."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# -- which one the client wants ---------------------------------------------------------------------------


def is_xml(content_type: bytes | None) -> bool:
    """``application/xml``, ``text/xml`` or ``application/<anything>+xml``, any parameters."""
    if content_type is None:
        return False
    media = content_type.partition(b";")[0].strip().lower()
    return media in _XML_TYPES or (media.startswith(b"application/") and media.endswith(b"+xml"))


def prefers_xml(accept: bytes | None) -> bytes | None:
    """The XML type to answer with when ``accept`` weighs XML (``application/xml`` or ``text/xml``)
    above JSON (RFC 9110 §12.5.1: the most specific range that matches a type gives its weight);
    None when it does not, ties included (the upstream's JSON then goes as it is)."""
    if not accept:
        return None
    exact: dict[bytes, int] = {}
    ranges: dict[bytes, int] = {}
    for media, weight in weighted_items(accept, _NO_ALIASES).items():
        (ranges if media.endswith(b"/*") else exact)[media] = weight
    json_weight = _weight(b"application/json", exact, ranges)
    best: bytes | None = None
    best_weight = json_weight
    for media in _XML_TYPES:
        weight = _weight(media, exact, ranges)
        if weight > best_weight:
            best, best_weight = media, weight
    return best


def _weight(media: bytes, exact: dict[bytes, int], ranges: dict[bytes, int]) -> int:
    found = exact.get(media)
    if found is not None:
        return found
    found = ranges.get(media.partition(b"/")[0] + b"/*")
    if found is not None:
        return found
    return ranges.get(b"*/*", 0)


# -- JSON to XML -------------------------------------------------------------------------------------------


def xml_name(key: str) -> str:
    """``key`` as an element name (the module docstring gives the encoding)."""
    if _PORTABLE.fullmatch(key) and not _ESCAPE_LIKE.search(key):
        return key
    if not key:
        return "_"
    out: list[str] = []
    for position, char in enumerate(key):
        allowed = _START if position == 0 else _NAME_CHAR
        if char == "_" and _ESCAPE_LIKE.match(key, position):
            out.append("_x005F_")
        elif allowed.match(char):
            out.append(char)
        else:
            code = ord(char)
            out.append(f"_x{code:04X}_" if code <= 0xFFFF else f"_x{code:08X}_")
    return "".join(out)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return _NOT_XML.sub("\ufffd", value).translate(_TEXT_ESCAPES)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same float, as JSON writes
    return str(value)  # an integer, every digit


def xml_of(document: Any, root: str) -> bytes:
    """``document`` (parsed JSON) as an XML document in the element ``root`` (an XML name).

    Written without recursion: documents may nest as deep as JSON allows."""
    out: list[str] = []
    # Work items: ("element", name, value) writes an element; ("close", name, None) ends one.
    pending: list[tuple[str, str, Any]] = [("element", root, document)]
    while pending:
        kind, name, value = pending.pop()
        if kind == "close":
            out.append(f"</{name}>")
            continue
        if isinstance(value, dict):
            out.append(f"<{name}>")
            pending.append(("close", name, None))
            for key, item in reversed(list(value.items())):
                _push_field(pending, xml_name(key), item)
        elif isinstance(value, list):  # an array in an array, or at the root: item elements
            out.append(f"<{name}>")
            pending.append(("close", name, None))
            for item in reversed(value):
                pending.append(("element", "item", item))
        elif value is None:
            out.append(f"<{name}/>")
        else:
            out.append(f"<{name}>{_text(value)}</{name}>")
    return DECLARATION + "".join(out).encode("utf-8")


def _push_field(pending: list[tuple[str, str, Any]], name: str, value: Any) -> None:
    """A field's elements onto the stack (popped in order): one, or one per item of an array."""
    if isinstance(value, list):
        for item in reversed(value):
            pending.append(("element", name, item))
    else:
        pending.append(("element", name, value))


# -- XML to JSON -------------------------------------------------------------------------------------------


class _Builder:
    """An ElementTree parser target that builds the JSON document as elements end (no tree, no
    recursion), refusing what the mapping has no place for."""

    def __init__(self) -> None:
        # One frame per open element: [name, fields (None until a child ends), text pieces].
        self.stack: list[list[Any]] = []
        self.root: Any = _MISSING

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        name = _decoded(tag.rpartition("}")[2])
        if attrib:
            raise XmlRefused(
                "xml_attributes",
                f"element <{_shown(name)}> has attributes, which have no JSON form here: "
                "send each value as an element",
            )
        if len(self.stack) >= MAX_DEPTH:
            raise XmlRefused("xml_too_deep", f"elements are nested deeper than {MAX_DEPTH}")
        self.stack.append([name, None, []])

    def data(self, text: str) -> None:
        if self.stack:
            self.stack[-1][2].append(text)

    def end(self, tag: str) -> None:
        name, fields, pieces = self.stack.pop()
        text = "".join(pieces)
        if fields is not None:
            if text.strip():
                raise XmlRefused(
                    "xml_mixed", f"element <{_shown(name)}> holds text beside elements (mixed content)"
                )
            value: Any = fields
        else:
            value = text if text else None
        if not self.stack:
            self.root = value
            return
        parent = self.stack[-1]
        if parent[1] is None:
            parent[1] = {}
        siblings: dict[str, Any] = parent[1]
        seen = siblings.get(name, _MISSING)
        if seen is _MISSING:
            siblings[name] = value
        elif isinstance(seen, list):  # values read from XML are never lists but for repeats
            seen.append(value)
        else:
            siblings[name] = [seen, value]

    def close(self) -> Any:
        return self.root


def _decoded(name: str) -> str:
    return _ESCAPED.sub(lambda found: _char(found.group(1)), name) if "_x" in name else name


def _char(digits: str) -> str:
    """An escaped name character; one JSON cannot carry (a lone surrogate, past U+10FFFF) is U+FFFD."""
    code = int(digits, 16)
    return chr(code) if code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else "\ufffd"


def _shown(name: str) -> str:
    """An element's name in a message: short, printable."""
    return name[:40].encode("ascii", "backslashreplace").decode("ascii")


def document_of(body: bytes) -> Any:
    """The JSON document an XML body maps to; ``XmlRefused`` says why one cannot be made."""
    parser = DefusedXMLParser(target=_Builder(), forbid_dtd=True, forbid_entities=True, forbid_external=True)
    try:
        parser.feed(body)
        document = parser.close()
    except XmlRefused:
        raise
    except DTDForbidden:
        raise XmlRefused(
            "xml_dtd",
            "XML with a document type declaration (<!DOCTYPE>) is refused: DTDs and "
            "their entities are never read or expanded",
        ) from None
    except EntitiesForbidden:
        raise XmlRefused(
            "xml_entities", "XML that declares entities is refused: entities are never expanded"
        ) from None
    except ExternalReferenceForbidden:
        raise XmlRefused("xml_external", "XML that references external entities is refused") from None
    except DefusedXmlException:
        raise XmlRefused("xml_dtd", "XML with a construct the gateway never reads is refused") from None
    except ParseError as exc:
        raise XmlRefused("xml_malformed", f"malformed XML: {exc}") from None
    except (ValueError, LookupError, RecursionError):  # an encoding it cannot read, say
        raise XmlRefused("xml_malformed", "malformed XML: it cannot be read") from None
    if document is _MISSING:
        raise XmlRefused("xml_malformed", "malformed XML: no root element")
    return document
