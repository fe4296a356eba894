"""The JSON body mapping as edits of the body's bytes (policies/transform/jsonsplice.py), held to
the result of reading the body with orjson, mapping the document and writing it back: on bodies
written every way (orjson's own form, whitespace, other escapes, other number forms, repeated
keys, damaged bytes), for generated mappings. Where the splicer answers, its bytes are exactly
the parsing way's; where it cannot, it says so and the parsing way runs."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from apigate.policies.transform.bodymap import NotMapped, Operations, dump, has_long_integer, load
from apigate.policies.transform.jsonmap import JsonMapping, parse_path
from apigate.policies.transform.jsonsplice import NOT_SPLICED, number_end, splice_plan

MANY = settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))

NAMES = ["user", "items", "internal", "meta", "source", "name", "full_name", "a", "é", 'q"t', "\x01"]


def parsed(operations: Operations, body: bytes) -> bytes | str | None:
    """The parsing way: orjson reads, the operations map, orjson writes (None: unchanged)."""
    try:
        document = load(body, False)
        if not operations.apply(document):
            return None
        return dump(document, False)
    except NotMapped as refused:
        return f"not mapped: {refused.reason}"


# -- bodies written many ways ------------------------------------------------------------------------------

# Numbers as text: orjson's own form and every other way of writing them.
_OTHER_NUMBER_TEXT = st.one_of(
    st.integers(min_value=-(10**22), max_value=10**22).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: orjson.dumps(f).decode()),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.builds(
        "{}{}.{}e{}".format,
        st.sampled_from(["", "-"]),
        st.integers(0, 10**20),
        st.integers(0, 10**20),
        st.integers(-400, 400),
    ).map(lambda text: text.removesuffix("e0")),
    st.sampled_from(["-0", "-0.0", "0.0", "1.0", "1.50", "0.00001", "0.000001", "1e5", "01", "1.", ".5"]),
)
_ORJSON_INTEGER_TEXT = st.integers(min_value=-(10**18) + 1, max_value=10**18 - 1).map(str)
_ORJSON_DECIMAL_TEXT = st.integers(min_value=-(10**6), max_value=10**6).map(
    lambda n: orjson.dumps(n / 100).decode()
)
_NUMBER_TEXT = st.one_of(  # other forms in one number of five
    _ORJSON_INTEGER_TEXT, _ORJSON_INTEGER_TEXT, _ORJSON_DECIMAL_TEXT, _ORJSON_DECIMAL_TEXT, _OTHER_NUMBER_TEXT
)


def _string_text(text: str, style: int) -> str:
    """A JSON string: orjson's way (0), ASCII escapes (1), or with ``/`` escaped (2)."""
    if style == 0:
        return orjson.dumps(text).decode()
    written = json.dumps(text, ensure_ascii=style == 1)
    return written.replace("/", "\\/") if style == 2 else written


_KEY = st.sampled_from(NAMES[:6]) | st.sampled_from(NAMES) | st.text(max_size=4)
_STRING = st.tuples(st.sampled_from(NAMES) | st.text(max_size=8), st.sampled_from([0, 0, 0, 0, 0, 1, 2]))


def _array(children: Any) -> Any:
    return st.lists(children, max_size=4).map(lambda items: ("array", items))


def _object(children: Any) -> Any:
    # A list of members, so that a key may repeat (in one object of four).
    member = st.tuples(st.tuples(_KEY, st.sampled_from([0, 0, 0, 1])), children)
    distinct = st.lists(member, max_size=5, unique_by=lambda member: member[0][0])
    members = st.one_of(distinct, distinct, distinct, st.lists(member, max_size=5))
    return members.map(lambda members: ("object", members))


def _tree(children: Any) -> Any:
    return _array(children) | _object(children)


_LEAF = (
    _NUMBER_TEXT.map(lambda text: ("raw", text))
    | st.sampled_from(["true", "false", "null"]).map(lambda text: ("raw", text))
    | _STRING.map(lambda pair: ("string", pair))
)
_VALUES = st.recursive(_LEAF, _tree, max_leaves=15)
_TREES = _object(_VALUES) | _object(_VALUES) | _array(_VALUES)


def write(tree: Any, spaced: bool) -> str:
    kind, content = tree
    if kind == "raw":
        return content
    if kind == "string":
        return _string_text(*content)
    comma, colon = (", ", ": ") if spaced else (",", ":")
    if kind == "array":
        return "[" + comma.join(write(item, spaced) for item in content) + "]"
    return "{" + comma.join(_string_text(*key) + colon + write(value, spaced) for key, value in content) + "}"


_ONE_IN_FIVE = st.sampled_from([False, False, False, False, True])


def _damaged(body: bytes, data: st.DataObject) -> bytes:
    if not body or not data.draw(_ONE_IN_FIVE):
        return body
    at = data.draw(st.integers(0, len(body) - 1))
    replacement = data.draw(
        st.sampled_from([b"", b" ", b",", b'"', b"\\", b"}", b"]", b"\xff", b"\xed\xa0\x80"])
    )
    return body[:at] + replacement + body[at + 1 :]


# -- mappings whose edits are local, and some that are not ---------------------------------------------------

_STEP = st.sampled_from(NAMES[:4]) | st.none()
_PATH = st.tuples(st.lists(_STEP, max_size=2), st.sampled_from(NAMES)).map(lambda p: (*p[0], p[1]))
_SCALAR = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
_VALUE = _SCALAR | st.text(max_size=5) | st.dictionaries(st.text(max_size=3), st.lists(_SCALAR, max_size=2))
_OPERATIONS = st.builds(
    Operations,
    remove=st.lists(_PATH, max_size=2),
    rename=st.lists(st.tuples(_PATH, st.sampled_from(NAMES)), max_size=1),
    move=st.just([]),
    copy=st.just([]),
    set=st.lists(st.tuples(_PATH, _VALUE), max_size=2),
)


@MANY
@given(tree=_TREES, spaced=_ONE_IN_FIVE, operations=_OPERATIONS, data=st.data())
def test_spliced_bodies_are_the_parsed_bodies_byte_for_byte(
    tree: Any, spaced: bool, operations: Operations, data: st.DataObject
) -> None:
    body = _damaged(write(tree, spaced).encode("utf-8"), data)
    plan = operations.splice
    assume(plan is not None and (operations.remove or operations.rename or operations.set))
    spliced = plan.map_body(body)
    if spliced != NOT_SPLICED:
        assert spliced == parsed(operations, body), body


_PLAIN_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**18) + 1, 10**18 - 1)
    | st.integers(-(10**6), 10**6).map(lambda n: n / 100)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEY, children, max_size=5),
    max_leaves=15,
)
_PLAIN_DOCUMENTS = st.dictionaries(_KEY, _PLAIN_VALUES, max_size=5) | st.lists(_PLAIN_VALUES, max_size=4)
_RENAMING_APART = st.builds(
    Operations,
    remove=st.lists(_PATH, max_size=3),
    rename=st.lists(st.tuples(_PATH, st.just("renamed")), max_size=2),  # a name no document has
    move=st.just([]),
    copy=st.just([]),
    set=st.lists(st.tuples(_PATH, _VALUE), max_size=3),
)


@MANY
@given(document=_PLAIN_DOCUMENTS, operations=_RENAMING_APART)
def test_orjsons_own_form_is_spliced(document: Any, operations: Operations) -> None:
    """What orjson writes (integers of up to 18 digits, decimals without exponent) is spliced
    whenever the mapping can be."""
    body = orjson.dumps(document)
    assume(operations.splice is not None and (operations.remove or operations.rename or operations.set))
    spliced = operations.splice.map_body(body)
    assert spliced != NOT_SPLICED, body
    assert spliced == parsed(operations, body), body


@MANY
@given(text=_OTHER_NUMBER_TEXT)
def test_a_number_is_taken_as_it_is_only_when_orjson_writes_it_so(text: str) -> None:
    body = text.encode()
    if number_end(body, 0) == len(body):
        assert orjson.dumps(orjson.loads(body)) == body


@settings(max_examples=300, derandomize=True, deadline=None)
@given(body=st.binary(max_size=120) | _TREES.map(lambda tree: write(tree, False).encode("utf-8")))
def test_map_body_answers_as_the_parsing_way(body: bytes) -> None:
    """Through ``map_body`` (splicing where it can): the same bytes, or the same refusal."""
    mapping = JsonMapping(
        remove=[parse_path("user.internal"), parse_path("items[*].internal")],
        rename=[(parse_path("user.name"), "full_name")],
        set=[(parse_path("meta.source"), "gateway")],
    )
    exact = has_long_integer(body)
    try:
        document = load(body, exact)
        expected: Any = dump(document, exact) if mapping.apply(document) else None
    except NotMapped as refused:
        expected = refused.reason
    try:
        assert mapping.map_body(body) == expected
    except NotMapped as refused:
        assert refused.reason == expected


BENCH_BODY = (
    b'{"user":{"id":42,"name":"Ada Lovelace","email":"ada@example.com","internal_id":"u-00042"},'
    b'"items":[{"id":1,"sku":"SKU-00001","name":"line item number 1","price":3.99,"qty":2,"internal":"w-01"},'
    b'{"id":2,"sku":"SKU-00002","name":"line item number 2","price":6.99,"qty":3,"internal":"w-02"}],'
    b'"note":"bench","pad":"\\"\\\\\\n\\u001f\xc5\xbc/"}'
)


def test_a_compact_body_is_mapped_without_parsing() -> None:
    operations = JsonMapping(
        remove=[parse_path("user.internal_id"), parse_path("items[*].internal")],
        rename=[(parse_path("user.name"), "full_name")],
        set=[(parse_path("meta.source"), "gateway"), (parse_path("items[*].currency"), "EUR")],
    ).operations
    assert operations.splice is not None
    spliced = operations.splice.map_body(BENCH_BODY)
    assert spliced != NOT_SPLICED
    assert spliced == parsed(operations, BENCH_BODY)
    assert spliced is not None and spliced.endswith(b',"meta":{"source":"gateway"}}')


@pytest.mark.parametrize(
    "operations",
    [
        {"move": [(("a",), ("b",))]},  # move and copy take the parsing way
        {"remove": [("items", 0, "x")]},  # an index
        {"remove": [("items", None)]},  # a whole array emptied
        {"remove": [("user",)], "rename": [(("user", "name"), "full_name")]},  # one on another's way
        {"remove": [("a",)], "set": [(("a",), 1)]},  # one place twice
        {"rename": [(("a",), "b")], "set": [(("b", "c"), 1)]},  # through a rename's new name
        {"rename": [(("a",), "a")]},
        {"set": [(("a", "b"), 1), (("a", None, "c"), 1)]},  # an object and an array
    ],
)
def test_mappings_whose_order_matters_take_the_parsing_way(operations: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"remove": [], "rename": [], "move": [], "copy": [], "set": []}
    assert splice_plan(**{**arguments, **operations}) is None
