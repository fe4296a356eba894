"""The `transform` policy's JSON/XML mapping (policies/transform/xmlmap.py) and its body mapper
(bodies.py) as pure functions: the documented mapping both ways, names, escapes, what is refused
(DTDs, entities, attributes, mixed content, depth) and which type a client's Accept asks for;
then, with Hypothesis, that no JSON document, XML text or Accept value makes them fail: every
output is well-formed and reads back."""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import pytest
from defusedxml.ElementTree import fromstring
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apigate.policies.transform.bodies import BodyMapper, changed_head, with_vary_accept
from apigate.policies.transform.counts import MALFORMED, MAPPED, TOO_DEEP, UNCHANGED, XML
from apigate.policies.transform.jsonmap import JsonMapping, parse_path
from apigate.policies.transform.xmlmap import (
    MAX_DEPTH,
    XmlRefused,
    document_of,
    prefers_xml,
    xml_name,
    xml_of,
)

DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>'
BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<lolz>&lol9;</lolz>"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<foo>&xxe;</foo>"""


def mapping(**operations: Any) -> JsonMapping:
    return JsonMapping(
        remove=[parse_path(p) for p in operations.get("remove", [])],
        rename=[(parse_path(p), n) for p, n in operations.get("rename", {}).items()],
        move=[(parse_path(a), parse_path(b)) for a, b in operations.get("move", {}).items()],
        copy=[(parse_path(a), parse_path(b)) for a, b in operations.get("copy", {}).items()],
        set=[(parse_path(p), v) for p, v in operations.get("set", {}).items()],
    )


# -- JSON to XML ---------------------------------------------------------------------------------------------


def test_the_documented_mapping_to_xml() -> None:
    document = {
        "user": {"name": "Ada", "age": 36, "score": 1.5, "admin": False, "nick": None},
        "tags": ["a", "b"],
        "empty": [],
        "grid": [[1, 2], [3]],
        "note": "a<b & c\r\n",
    }
    assert xml_of(document, "order") == DECLARATION + (
        b"<order><user><name>Ada</name><age>36</age><score>1.5</score><admin>false</admin><nick/></user>"
        b"<tags>a</tags><tags>b</tags>"
        b"<grid><item>1</item><item>2</item></grid><grid><item>3</item></grid>"
        b"<note>a&lt;b &amp; c&#13;\n</note></order>"
    )


def test_a_document_that_is_not_an_object_goes_inside_the_root() -> None:
    assert (
        xml_of([1, {"a": True}], "root")
        == DECLARATION + b"<root><item>1</item><item><a>true</a></item></root>"
    )
    assert xml_of("text", "r") == DECLARATION + b"<r>text</r>"
    assert xml_of(None, "r") == DECLARATION + b"<r/>"


def test_integers_keep_every_digit_and_floats_their_shortest_text() -> None:
    assert xml_of({"n": 123456789012345678901234567890, "f": 0.1, "e": 1e300}, "r") == DECLARATION + (
        b"<r><n>123456789012345678901234567890</n><f>0.1</f><e>1e+300</e></r>"
    )


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("plain", "plain"),
        ("with-dash.and_dot", "with-dash.and_dot"),
        ("\u017c\u00f3\u0142w", "\u017c\u00f3\u0142w"),
        ("first name", "first_x0020_name"),
        ("1st", "_x0031_st"),
        ("", "_"),
        ("a:b", "a_x003A_b"),
        ("_x0041_", "_x005F_x0041_"),
        ("\u4e2d", "_x4E2D_"),
        ("\U0001f600", "_x0001F600_"),
        ("-x", "_x002D_x"),
    ],
)
def test_keys_become_names_every_parser_reads(key: str, name: str) -> None:
    assert xml_name(key) == name
    written = xml_of({key: "v"}, "r")
    assert fromstring(written)[0].tag == name  # well-formed: defusedxml reads it
    assert document_of(written) == {key if key else "_": "v"}  # and the name decodes back


def test_escapes_of_characters_json_cannot_carry_read_as_the_replacement_character() -> None:
    assert document_of(b"<r><_xD800_>1</_xD800_><_x00110000_/></r>") == {"\ufffd": ["1", None]}
    assert orjson.loads(BodyMapper(None).xml_body(b"<r><_xD800_>1</_xD800_></r>")) == {"\ufffd": "1"}


def test_text_xml_cannot_carry_becomes_the_replacement_character() -> None:
    written = xml_of({"a": "x\x00y\x1f\ufffez\t"}, "r")
    assert document_of(written) == {"a": "x\ufffdy\ufffd\ufffdz\t"}


def test_a_deep_document_is_written_without_recursion() -> None:
    document: Any = "leaf"
    for _ in range(5000):
        document = {"a": document}
    written = xml_of(document, "r")
    assert written.count(b"<a>") == 5000 and written.endswith(b"</a></r>")


# -- XML to JSON ---------------------------------------------------------------------------------------------


def test_the_documented_mapping_from_xml() -> None:
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<order>\n  <id>7</id>\n  <line><sku>a</sku></line>\n'
        b"  <line><sku>b</sku><qty>2</qty></line>\n  <note/>\n  <text> spaced </text>\n</order>"
    )
    assert document_of(body) == {
        "id": "7",
        "line": [{"sku": "a"}, {"sku": "b", "qty": "2"}],
        "note": None,
        "text": " spaced ",
    }


def test_namespaces_are_read_by_local_name_and_comments_ignored() -> None:
    body = b'<a xmlns="urn:x" xmlns:p="urn:p"><!-- c --><p:b>1</p:b><?pi x?><c>&amp;&#65;</c></a>'
    assert document_of(body) == {"b": "1", "c": "&A"}


def test_other_encodings_are_read() -> None:
    body = '<?xml version="1.0" encoding="ISO-8859-2"?><a><b>\u017c\u00f3\u0142w</b></a>'.encode("iso-8859-2")
    assert document_of(body) == {"b": "\u017c\u00f3\u0142w"}
    assert document_of("<a><b>\u00e9</b></a>".encode("utf-16")) == {"b": "\u00e9"}


@pytest.mark.parametrize(
    ("body", "reason", "words"),
    [
        (BILLION_LAUGHS, "xml_dtd", "never read or expanded"),
        (EXTERNAL_ENTITY, "xml_dtd", "DOCTYPE"),
        (b'<!DOCTYPE a SYSTEM "http://127.0.0.1:9/a.dtd"><a/>', "xml_dtd", "DOCTYPE"),
        (b"<a>&undefined;</a>", "xml_malformed", "undefined entity"),
        (b"<a><b></a>", "xml_malformed", "line 1"),
        (b"", "xml_malformed", "no element found"),
        (b"not xml", "xml_malformed", "malformed"),
        (b"<a/><b/>", "xml_malformed", "junk after document element"),
        (b'<a id="1"><b/></a>', "xml_attributes", "<a> has attributes"),
        (b"<a>text<b/>more</a>", "xml_mixed", "mixed content"),
        (b"<a>" * (MAX_DEPTH + 1) + b"</a>" * (MAX_DEPTH + 1), "xml_too_deep", str(MAX_DEPTH)),
        (b'<?xml version="1.0" encoding="no-such-encoding"?><a/>', "xml_malformed", "malformed"),
    ],
    ids=[
        "billion-laughs",
        "external-entity",
        "external-dtd",
        "undefined-entity",
        "unclosed",
        "empty",
        "text",
        "two-roots",
        "attributes",
        "mixed",
        "too-deep",
        "unknown-encoding",
    ],
)
def test_xml_that_cannot_be_mapped_is_refused_with_a_reason(body: bytes, reason: str, words: str) -> None:
    started = time.monotonic()
    with pytest.raises(XmlRefused) as refused:
        document_of(body)
    assert refused.value.reason == reason
    assert words in refused.value.message
    assert time.monotonic() - started < 1.0  # refused up front, nothing expanded


def test_the_deepest_accepted_document_still_writes_as_json() -> None:
    body = b"<a>" * MAX_DEPTH + b"x" + b"</a>" * MAX_DEPTH
    document = document_of(body)
    assert orjson.loads(BodyMapper(None).xml_body(body)) == document


# -- the body mapper, both ways ------------------------------------------------------------------------------

NESTED = {
    "user": {"internal_id": 7, "name": "Ada", "email": "ada@example.com"},
    "items": [{"id": 1, "price": 10, "tags": ["x"]}, {"id": 2, "price": 20, "tags": []}],
    "legacy": {"id": "L-1"},
}
OPERATIONS = mapping(
    remove=["user.internal_id", "items[*].price"],
    rename={"user.name": "full_name"},
    move={"legacy.id": "id"},
    copy={"user.email": "contact.email"},
    set={"items[*].currency": "EUR", "meta.source": "gateway"},
)
MAPPED_DOCUMENT = {
    "user": {"full_name": "Ada", "email": "ada@example.com"},
    "items": [
        {"id": 1, "tags": ["x"], "currency": "EUR"},
        {"id": 2, "tags": [], "currency": "EUR"},
    ],
    "legacy": {},
    "id": "L-1",
    "contact": {"email": "ada@example.com"},
    "meta": {"source": "gateway"},
}


def test_the_mapper_maps_nested_fields_and_arrays() -> None:
    slot, out = BodyMapper(OPERATIONS).json_body(orjson.dumps(NESTED))
    assert slot == MAPPED and out is not None
    assert orjson.loads(out) == MAPPED_DOCUMENT


def test_the_mapper_writes_the_mapped_document_as_xml() -> None:
    slot, out = BodyMapper(OPERATIONS).json_body(orjson.dumps(NESTED), "doc")
    assert slot == XML and out is not None
    assert document_of(out) == {
        "user": {"full_name": "Ada", "email": "ada@example.com"},
        "items": [{"id": "1", "tags": "x", "currency": "EUR"}, {"id": "2", "currency": "EUR"}],
        "legacy": None,
        "id": "L-1",
        "contact": {"email": "ada@example.com"},
        "meta": {"source": "gateway"},
    }


def test_the_mapper_maps_xml_requests_too() -> None:
    body = b"<r><user><internal_id>7</internal_id><name>Ada</name></user><items><price>1</price></items></r>"
    assert orjson.loads(BodyMapper(OPERATIONS).xml_body(body)) == {
        "user": {"full_name": "Ada"},
        "items": {"price": "1"},  # one element is an object, not an array: items[*] reaches nothing
        "meta": {"source": "gateway"},
    }


@pytest.mark.parametrize(
    ("body", "slot"),
    [
        (b'{"a": 1}', UNCHANGED),
        (b'{"user": ', MALFORMED),
        (b'{"a": NaN}', MALFORMED),
        (b"\xff\xfe{}", MALFORMED),
        (b'{"user": {"internal_id": 1, "a":' * 150 + b"1" + b"}}" * 150, TOO_DEEP),  # too deep to write
    ],
    ids=["unchanged", "truncated", "nan", "not-utf8", "too-deep"],
)
def test_what_the_mapper_leaves_alone(body: bytes, slot: int) -> None:
    assert BodyMapper(mapping(remove=["user.internal_id"])).json_body(body) == (slot, None)


def test_a_changed_head_weakens_the_etag_or_drops_it_for_xml() -> None:
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", b"10"),
        (b"etag", b'"v1"'),
        (b"accept-ranges", b"bytes"),
        (b"content-digest", b"sha-256=:x:"),
        (b"x-kept", b"1"),
    ]
    assert changed_head(head, None) == [
        (b"content-type", b"application/json"),
        (b"etag", b'W/"v1"'),
        (b"x-kept", b"1"),
    ]
    assert changed_head(head, b"text/xml") == [
        (b"content-type", b"text/xml; charset=utf-8"),
        (b"x-kept", b"1"),
    ]
    assert changed_head([(b"etag", b'W/"v1"')], None) == [(b"etag", b'W/"v1"')]


def test_vary_names_accept_once() -> None:
    assert with_vary_accept([]) == [(b"vary", b"Accept")]
    assert with_vary_accept([(b"vary", b"Origin")]) == [(b"vary", b"Origin, Accept")]
    assert with_vary_accept([(b"vary", b"accept")]) == [(b"vary", b"accept")]
    assert with_vary_accept([(b"vary", b"*")]) == [(b"vary", b"*")]


# -- which type the client asks for -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "answer"),
    [
        (None, None),
        (b"", None),
        (b"application/xml", b"application/xml"),
        (b"text/xml", b"text/xml"),
        (b"Application/XML", b"application/xml"),
        (b"*/*", None),
        (b"application/json", None),
        (b"application/json, application/xml", None),  # a tie keeps JSON
        (b"application/xml, application/json;q=0.9", b"application/xml"),
        (b"application/json;q=0.1, */*", b"application/xml"),
        (b"application/*;q=0.5, text/xml;q=0.4", None),
        (b"text/*, application/json;q=0.5", b"text/xml"),
        (b"application/xml;q=2, application/json;q=0.5", None),  # a malformed weight: not named
        (b"application/xml;q=0", None),
        (b"text/html", None),
    ],
)
def test_xml_is_chosen_only_when_weighed_above_json(accept: bytes | None, answer: bytes | None) -> None:
    assert prefers_xml(accept) == answer


# -- no input makes them fail -------------------------------------------------------------------------------

_KEYS = st.text(max_size=12)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
JSON_DOCUMENTS = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=40,
)
HYPOTHESIS = settings(
    max_examples=150, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck)
)


def _dumped(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")


@HYPOTHESIS
@given(document=JSON_DOCUMENTS)
def test_every_json_document_maps_to_well_formed_json_and_xml(document: Any) -> None:
    body = _dumped(document)
    mapper = BodyMapper(OPERATIONS)
    slot, out = mapper.json_body(body)
    if out is not None:
        assert slot == MAPPED
        json.loads(out)  # well-formed JSON, every digit kept
    slot, out = mapper.json_body(body, "root")
    if out is not None:
        assert slot == XML
        fromstring(out)  # well-formed XML, read by a strict parser
        orjson.loads(BodyMapper(None).xml_body(out))  # and it reads back as JSON


_SIMPLE_KEYS = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)
_STRINGS = st.text(
    alphabet=st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters="\ufffe\uffff"), min_size=1
)


@HYPOTHESIS
@given(
    document=st.recursive(
        _STRINGS,
        lambda children: st.dictionaries(_SIMPLE_KEYS, children, min_size=1, max_size=4),
        max_leaves=20,
    )
)
def test_objects_of_text_round_trip_exactly(document: Any) -> None:
    assert document_of(xml_of(document, "root")) == document


_XML_PIECES = st.sampled_from(
    [
        "<a>", "</a>", "<b>", "</b>", "<a/>", "text", "&amp;", "&lt;", "&#65;", "&#0;", "&x;", "<!-- c -->",
        '<!DOCTYPE a [<!ENTITY x "y">]>', '<?xml version="1.0"?>', "<![CDATA[<c>]]>", ' id="1"',
        "\u017c", "\x00", "<", ">", "]]>", "<?pi?>", "xmlns:p='urn:p'", "<p:a>", "</p:a>", "_x0041_",
        "<_xD800_>", "</_xD800_>", "<_x110000_/>",
    ]
)  # fmt: skip


@HYPOTHESIS
@given(pieces=st.lists(_XML_PIECES, max_size=25), raw=st.binary(max_size=60))
def test_no_xml_input_fails_other_than_by_refusal(pieces: list[str], raw: bytes) -> None:
    for body in ("".join(pieces).encode("utf-8"), raw):
        try:
            document = document_of(body)
        except XmlRefused as refused:
            assert refused.reason.startswith("xml_") and refused.message
            continue
        orjson.loads(orjson.dumps(document))


@HYPOTHESIS
@given(accept=st.binary(max_size=80) | st.text(alphabet="abcjxmlnopst/*+;=q.,0123456789 ", max_size=80))
def test_no_accept_value_fails(accept: bytes | str) -> None:
    value = accept.encode() if isinstance(accept, str) else accept
    assert prefers_xml(value) in (None, b"application/xml", b"text/xml")
