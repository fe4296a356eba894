"""The JSON body mapping of the `transform` policy (policies/transform/jsonmap.py) as a pure function:
paths, each operation, what it leaves alone, and (Hypothesis) that no document makes it raise."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apigate.config.templates import parse_template
from apigate.policies.transform.jsonmap import JsonMapping, NotMapped, parse_path, path_text


@pytest.mark.parametrize(
    ("text", "steps"),
    [
        ("user", ("user",)),
        ("user.internal_id", ("user", "internal_id")),
        ("items[*].price", ("items", None, "price")),
        ("items[0].id", ("items", 0, "id")),
        ("items[-1]", ("items", -1)),
        ("[0].id", (0, "id")),
        ("matrix[1][*]", ("matrix", 1, None)),
        ("a b.c-d", ("a b", "c-d")),
    ],
)
def test_paths_compile_to_steps(text: str, steps: tuple[Any, ...]) -> None:
    assert parse_path(text) == steps
    assert path_text(steps) == text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "cannot be empty"),
        (".a", "starts with a field name"),
        ("a.", "cannot be empty"),
        ("a..b", "cannot be empty"),
        ("a[x]", "[N], [-N] or [*]"),
        ("a[1", "[N], [-N] or [*]"),
        ("a[0]b", "followed by . or ["),
        ("a]", "followed by . or ["),
        ("a[0]]", "followed by . or ["),
    ],
)
def test_bad_paths_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_path(text)


def mapping(**operations: Any) -> JsonMapping:
    compiled: dict[str, Any] = {}
    for name, value in operations.items():
        if name == "remove":
            compiled[name] = [parse_path(p) for p in value]
        elif name == "rename":
            compiled[name] = [(parse_path(p), new) for p, new in value.items()]
        elif name == "set":
            compiled[name] = [(parse_path(p), v) for p, v in value.items()]
        else:
            compiled[name] = [(parse_path(a), parse_path(b)) for a, b in value.items()]
    return JsonMapping(**compiled)


def mapped(document: Any, **operations: Any) -> tuple[bool, Any]:
    document = copy.deepcopy(document)
    changed = mapping(**operations).apply(document)
    return changed, document


ORDER = {
    "user": {"id": 1, "internal_id": 9, "name": "Ada"},
    "items": [{"price": 1}, {"price": 2}, {"other": 3}],
}


def test_set_creates_objects_on_the_way_and_in_every_element() -> None:
    changed, document = mapped(ORDER, set={"meta.source.name": "gw", "items[*].currency": "EUR"})
    assert changed
    assert document["meta"] == {"source": {"name": "gw"}}
    assert [item["currency"] for item in document["items"]] == ["EUR", "EUR", "EUR"]


def test_set_never_makes_an_object_where_an_array_was_meant() -> None:
    changed, document = mapped(ORDER, set={"list[0].a": 1, "items[9].a": 1, "user.id.deeper": 1})
    assert (changed, document) == (False, ORDER)


def test_set_values_are_never_shared() -> None:
    value = {"nested": [1]}
    operations = mapping(set={"items[*].tag": value, "copy": value})
    document = copy.deepcopy(ORDER)
    operations.apply(document)
    document["items"][0]["tag"]["nested"].append(2)
    document["copy"]["nested"].append(3)
    assert value == {"nested": [1]}
    assert document["items"][1]["tag"] == {"nested": [1]}


def test_remove_fields_elements_and_whole_arrays() -> None:
    changed, document = mapped(ORDER, remove=["user.internal_id", "items[*].price", "nothing.here"])
    assert changed
    assert document == {"user": {"id": 1, "name": "Ada"}, "items": [{}, {}, {"other": 3}]}
    assert mapped(ORDER, remove=["items[-1]"])[1]["items"] == [{"price": 1}, {"price": 2}]
    assert mapped(ORDER, remove=["items[*]"])[1]["items"] == []
    assert mapped(ORDER, remove=["user.missing"]) == (False, ORDER)


def test_rename_keeps_the_place_and_replaces_a_field_of_that_name() -> None:
    changed, document = mapped(ORDER, rename={"user.internal_id": "name", "items[*].price": "cost"})
    assert changed
    assert list(document["user"].items()) == [("id", 1), ("name", 9)]
    assert document["items"] == [{"cost": 1}, {"cost": 2}, {"other": 3}]
    assert mapped(ORDER, rename={"user.id": "id"}) == (False, ORDER)


def test_move_and_copy() -> None:
    changed, document = mapped(ORDER, move={"user.internal_id": "audit.user_id"}, copy={"user.id": "ids[0]"})
    assert changed
    assert document["audit"] == {"user_id": 9} and "internal_id" not in document["user"]
    assert "ids" not in document  # an index is never created: the copy has nowhere to go
    changed, document = mapped(ORDER, copy={"items": "snapshot"})
    document["snapshot"][0]["price"] = 100
    assert document["items"][0]["price"] == 1


def test_a_move_with_nowhere_to_go_leaves_the_value_where_it_was() -> None:
    assert mapped(ORDER, move={"user.name": "items[7]"}) == (False, ORDER)
    assert mapped(ORDER, move={"items[0]": "user.id.x"}) == (False, ORDER)


def test_a_move_into_itself_wraps_the_value() -> None:
    changed, document = mapped({"a": {"b": 1}}, move={"a": "a.inner"})
    assert (changed, document) == (True, {"a": {"inner": {"b": 1}}})


def test_operations_run_remove_rename_move_copy_set() -> None:
    _, document = mapped(
        {"a": 1, "b": 2},
        set={"a": "set"},
        remove=["a"],
        rename={"b": "a"},
        copy={"a": "c"},
    )
    # remove a, rename b -> a, copy a -> c, set a
    assert document == {"a": "set", "c": 2}


def test_a_document_of_another_shape_is_left_alone() -> None:
    for document in (None, 1, "text", [1, 2], [[{"user": 1}]], {"user": "x"}, {"items": {"0": {}}}):
        assert mapped(document, remove=["user.internal_id", "items[0]"], rename={"items[*].x": "y"}) == (
            False,
            document,
        )


def test_a_root_array_is_addressed_by_index() -> None:
    _, document = mapped([{"id": 1, "x": 0}, {"id": 2}], remove=["[*].x"], set={"[0].first": True})
    assert document == [{"id": 1, "first": True}, {"id": 2}]


def test_map_body_over_bytes() -> None:
    operations = mapping(remove=["secret"])
    assert operations.map_body(b'{"secret": 1, "a": "\xc5\xbc"}') == '{"a":"\u017c"}'.encode()
    assert operations.map_body(b'{"a": 1}') is None  # unchanged: the body goes as it came
    for body in (b"{", b"", b"{'a': 1}", b'{"a": NaN}', b"\xff", b'{"a": 1} x'):
        with pytest.raises(NotMapped) as caught:
            operations.map_body(body)
        assert caught.value.reason == "malformed"


def test_integers_beyond_64_bits_keep_every_digit() -> None:
    operations = mapping(remove=["secret"])
    body = b'{"secret": 1, "n": 123456789012345678901234567890, "f": 0.1, "s": "\\u00e9"}'
    assert operations.map_body(body) == b'{"n":123456789012345678901234567890,"f":0.1,"s":"\xc3\xa9"}'
    with pytest.raises(NotMapped):
        operations.map_body(b'{"secret": 11111111111111111111, "x": NaN}')


def test_a_document_too_deep_to_write_back_is_not_mapped() -> None:
    deep = b"[" * 500 + b"]" * 500
    body = b'{"secret": 1, "deep": ' + deep + b"}"
    with pytest.raises(NotMapped) as caught:
        mapping(remove=["secret"]).map_body(body)
    assert caught.value.reason in ("too_deep", "malformed")
    exact = b'{"secret": 11111111111111111111, "deep": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(NotMapped):
        mapping(remove=["secret"]).map_body(exact)


def test_body_values_take_no_variables() -> None:
    assert parse_template("$${tenant_id}") == [(False, "${tenant_id}")]


# -- Hypothesis: whatever the document, the mapping never raises -----------------------------------------

_KEYS = st.sampled_from(["user", "items", "internal_id", "price", "a", "", "0", "x.y"]) | st.text(max_size=5)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=40,
)
_STEP = st.sampled_from(["user", "items", "internal_id", "price", "a"]) | st.integers(-3, 3) | st.none()
_PATH = st.lists(_STEP, min_size=1, max_size=4).map(tuple)
_SINGLE_PATH = st.lists(
    st.sampled_from(["user", "items", "a"]) | st.integers(-2, 2), min_size=1, max_size=3
).map(tuple)
_MAPPING = st.builds(
    JsonMapping,
    remove=st.lists(_PATH, max_size=3),
    rename=st.lists(st.tuples(_PATH, st.sampled_from(["user", "renamed", "a"])), max_size=2),
    move=st.lists(st.tuples(_SINGLE_PATH, _SINGLE_PATH), max_size=2),
    copy=st.lists(st.tuples(_SINGLE_PATH, _SINGLE_PATH), max_size=2),
    set=st.lists(st.tuples(_PATH, _JSON), max_size=3),
)


@settings(max_examples=400, derandomize=True, deadline=None)
@given(document=_JSON, operations=_MAPPING)
def test_no_document_makes_the_mapping_raise(document: Any, operations: JsonMapping) -> None:
    before = copy.deepcopy(document)
    if not operations.apply(document):
        assert document == before
    json.dumps(document)  # still a JSON document: only JSON types, no cycle


@settings(max_examples=300, derandomize=True, deadline=None)
@given(body=st.binary(max_size=200) | _JSON.map(lambda document: json.dumps(document).encode()))
def test_no_body_makes_map_body_raise_anything_but_not_mapped(body: bytes) -> None:
    operations = mapping(
        remove=["user.internal_id"], set={"meta.source": "gw"}, rename={"items[*].price": "cost"}
    )
    try:
        result = operations.map_body(body)
    except NotMapped:
        return
    if result is not None:  # None: nothing to change (not an object, say)
        json.loads(result)
