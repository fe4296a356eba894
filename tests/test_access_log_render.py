"""The access log's lines made a batch at a time (render.py): compiled, the C writes exactly the
bytes of the Python reference for any record, whatever its values' types, and each line is one
line of valid JSON. tests/test_compiled_engine.py runs this file against the compiled build
(with APIGATE_EXPECT_COMPILED=1), where ``render`` is the C."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apigate.config.accesslog import FIELDS
from apigate.observe.accesslog import render as render_module
from apigate.observe.accesslog.hotpath import UNPRINTABLE, json_text
from apigate.observe.accesslog.render import RECORD_SIZE, render, render_in_python

TEXT = st.text(max_size=30)
# Values of any JSON-able type, and some that are not (written by orjson's default: str()).
ANY_VALUE = (
    st.none()
    | TEXT
    | st.integers()
    | st.floats(allow_nan=False)
    | st.booleans()
    | st.lists(TEXT, max_size=3)
    | st.dictionaries(TEXT, TEXT, max_size=2)
    | st.binary(max_size=8)
)
IDS = st.binary(max_size=40) | st.text(max_size=10)
NUMBERS = st.integers(0, 2**20) | st.integers() | st.floats(allow_nan=False) | st.none() | TEXT
NOW = time.monotonic()

RECORDS = st.tuples(
    st.booleans(),  # keep_nulls
    st.just(None),  # choose
    st.floats(0, 10_000),  # start (monotonic)
    NUMBERS,  # duration_us
    IDS,  # request_id
    IDS,  # trace_id
    ANY_VALUE,  # client_ip
    ANY_VALUE,  # method
    ANY_VALUE,  # path
    NUMBERS,  # status
    NUMBERS,  # bytes_in
    NUMBERS,  # bytes_out
    NUMBERS,  # attempts
    ANY_VALUE,  # route
    ANY_VALUE,  # upstream
    st.none() | NUMBERS,  # upstream_us
    *[ANY_VALUE] * 8,  # consumer, tenant, key_id, user_id, limited, cache, tried, error
    st.none() | st.dictionaries(TEXT, TEXT, max_size=2).map(json_text),  # headers
)
OFFSET = time.time() - NOW


def test_a_record_has_every_field() -> None:
    assert len(RECORDS.wrapped_strategy.element_strategies) == RECORD_SIZE  # type: ignore[attr-defined]


def test_the_render_in_use_is_the_compiled_one_when_built() -> None:
    assert (os.environ.get("APIGATE_EXPECT_COMPILED") == "1") == render_module.COMPILED


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(RECORDS, min_size=1, max_size=4))
def test_lines_are_the_references_bytes_and_valid_json(records: list[tuple[Any, ...]]) -> None:
    made = render(records, OFFSET, json_text)
    assert made == render_in_python(records, OFFSET, json_text)
    lines = made.split(b"\n")
    assert lines.pop() == b"" and len(lines) == len(records)
    for line, record in zip(lines, records, strict=True):
        parsed = json.loads(line.decode("utf-8"))  # strict UTF-8: no lone surrogate is left
        assert tuple(parsed)[:11] == FIELDS[:11]  # time to attempts: always there
        assert parsed["client_ip"] == json.loads(json_text(record[6]))
        if record[0]:  # keep_nulls: every field is there
            assert "consumer" in parsed and "error" in parsed and "route" in parsed


def test_plain_values_are_written_as_they_are() -> None:
    start = time.monotonic()
    record = (
        False,
        None,
        start,
        1_234_567,
        b"rid-1",
        b"0af7651916cd43dd8448eb211c80319c",
        "203.0.113.9",
        "GET",
        "/api/x",
        200,
        10,
        2**40,
        1,
        "orders",
        "10.0.0.2:8080",
        5,
        "acme",
        None,
        "k1",
        None,
        None,
        "hit",
        None,
        None,
        b'{"x-device":"d1"}',
    )
    line = render([record], OFFSET, json_text)
    wall = datetime.fromtimestamp(start + OFFSET, UTC)
    assert line == (
        b'{"time":"'
        + wall.strftime("%Y-%m-%dT%H:%M:%S.").encode()
        + b"%03dZ" % (wall.microsecond // 1000)
        + b'","request_id":"rid-1","trace_id":"0af7651916cd43dd8448eb211c80319c","client_ip":"203.0.113.9",'
        b'"method":"GET","path":"/api/x","status":200,"duration_ms":1234.567,"bytes_in":10,'
        b'"bytes_out":1099511627776,"attempts":1,"route":"orders","upstream":"10.0.0.2:8080",'
        b'"upstream_ms":0.005,"consumer":"acme","key_id":"k1","cache":"hit","headers":{"x-device":"d1"}}\n'
    )


def test_values_that_need_escaping_are_escaped() -> None:
    record = list(
        (False, None, NOW, 0, b'a"b\\c\x01\xff', b"t", "::1", "GET", '/a"\n\u00e9\ud800', 200, 0, 0, 1)
    )
    record += [None, 'h"ost:80', None, "caf\u00e9", None, None, None, None, None, ["a", "b"], "x\x00", None]
    [parsed] = [json.loads(line) for line in render([tuple(record)], OFFSET, json_text).splitlines()]
    assert parsed["request_id"] == 'a"b\\c\x01\u00ff'
    assert parsed["path"] == '/a"\n\u00e9\ud800'
    assert parsed["upstream"] == 'h"ost:80'
    assert (parsed["consumer"], parsed["tried"], parsed["error"]) == ("caf\u00e9", ["a", "b"], "x\x00")


def test_a_batch_larger_than_its_first_guess_grows() -> None:
    long_path = "/" + "p" * 100_000
    records = [(False, None, NOW, 0, b"r", b"r", "ip", "GET", long_path, 200, 0, 0, 1, *[None] * 12)] * 3
    made = render(records, OFFSET, json_text)
    assert made == render_in_python(records, OFFSET, json_text) and made.count(long_path.encode()) == 3


def test_chosen_fields_are_made_by_the_records_choose() -> None:
    record = (False, lambda whole: b'{"status":' + str(json.loads(whole)["status"]).encode() + b"}\n")
    record += (NOW, 0, b"r", b"r", "ip", "GET", "/", 418, 0, 0, 1, *[None] * 12)
    assert render([record, record], OFFSET, json_text) == b'{"status":418}\n' * 2


@pytest.mark.parametrize("broken", [(), (False,) * 24, [None] * RECORD_SIZE])
def test_a_record_that_is_not_one_is_refused(broken: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        render([broken], OFFSET, json_text)


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text")


def test_a_value_without_text_costs_its_field_not_the_batch() -> None:
    good = (False, None, NOW, 0, b"r", b"r", "ip", "GET", "/", 200, 0, 0, 1, *[None] * 12)
    bad = (*good[:16], Unprintable(), *good[17:])  # a plugin's consumer that cannot be printed
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    deeper = (*good[:22], deep, *good[23:])  # tried, nested past the recursion limit
    lines = [json.loads(line) for line in render([good, bad, deeper, good], OFFSET, json_text).splitlines()]
    assert len(lines) == 4 and lines[0] == {**lines[3], "time": lines[0]["time"]}
    assert lines[1]["consumer"] == lines[2]["tried"] == json.loads(UNPRINTABLE)
