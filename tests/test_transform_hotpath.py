"""The byte loops and header edits of the `transform` policy's compiled per-request work
(policies/transform/hotpath.py and bodymap.py), against the rules they replace: the regular
expressions they stand for, and header lists edited in place or rebuilt."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from apigate.policies.transform.bodymap import has_long_integer
from apigate.policies.transform.hotpath import CompiledEdits, Template, field_safe

LONG_INTEGER = re.compile(rb"[0-9]{20}")
UNSAFE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

# Digits in runs of every length around 20, with other bytes between them.
digit_runs = st.lists(
    st.one_of(
        st.integers(min_value=0, max_value=45).map(lambda n: b"7" * n),
        st.binary(max_size=30),
        st.sampled_from([b'"', b",", b".", b"e", b"-", b" "]),
    ),
    max_size=40,
).map(b"".join)


@given(digit_runs)
@settings(max_examples=500)
def test_a_long_integer_is_found_as_the_regular_expression_finds_it(body: bytes) -> None:
    assert has_long_integer(body) == (LONG_INTEGER.search(body) is not None)


def test_a_long_integer_is_found_wherever_it_lies() -> None:
    for size in range(0, 70):
        for start in range(0, 70 - size):
            body = b"x" * start + b"1" * size + b"y" * (70 - start - size)
            assert has_long_integer(body) == (size >= 20), (start, size)


@given(st.binary(max_size=64))
@settings(max_examples=500)
def test_a_field_value_is_safe_as_the_regular_expression_said(value: bytes) -> None:
    assert field_safe(value) == (UNSAFE.search(value) is None)


def test_every_byte_is_judged_as_rfc_9110_says() -> None:
    for byte in range(256):
        assert field_safe(bytes([byte])) == (byte == 9 or 32 <= byte != 127), byte


class FakeExchange:
    rid = b"0123456789abcdef"


def value(text: bytes) -> Template:
    return Template([text], [])


def request_id(exchange: Any) -> bytes | None:
    return exchange.rid


def test_headers_without_a_removed_name_are_edited_in_place() -> None:
    edits = CompiledEdits([b"cookie"], {}, [(b"x-id", Template([b"id=", b"!"], [request_id]))], [])
    headers = [(b"host", b"a"), (b"accept", b"*/*")]
    edited = edits.apply(headers, FakeExchange())  # type: ignore[arg-type]
    assert edited is headers
    assert edited == [(b"host", b"a"), (b"accept", b"*/*"), (b"x-id", b"id=0123456789abcdef!")]


def test_headers_with_a_removed_or_renamed_name_are_rebuilt() -> None:
    edits = CompiledEdits([b"cookie"], {b"x-old": b"x-new"}, [], [(b"x-add", value(b"1"))])
    headers = [(b"cookie", b"c"), (b"host", b"a"), (b"x-old", b"v")]
    edited = edits.apply(headers, FakeExchange())  # type: ignore[arg-type]
    assert headers == [(b"cookie", b"c"), (b"host", b"a"), (b"x-old", b"v")]  # the client's, kept
    assert edited == [(b"host", b"a"), (b"x-new", b"v"), (b"x-add", b"1")]


def test_a_set_value_replaces_every_value_the_client_sent() -> None:
    edits = CompiledEdits([], {}, [(b"x-id", Template([b"", b""], [request_id]))], [])
    headers = [(b"x-id", b"forged"), (b"host", b"a"), (b"x-id", b"again")]
    edited = edits.apply(headers, FakeExchange())  # type: ignore[arg-type]
    assert edited == [(b"host", b"a"), (b"x-id", b"0123456789abcdef")]


def test_templates_with_several_variables_or_none_render_whole_or_not_at_all() -> None:
    exchange: Any = FakeExchange()
    assert Template([b"a", b"-", b"z"], [request_id, request_id]).render(exchange) == (
        b"a0123456789abcdef-0123456789abcdefz"
    )
    assert Template([b"", b""], [lambda _: b"x\r\ny"]).render(exchange) is None
    assert Template([b"a", b"b"], [lambda _: None]).render(exchange) is None
    assert Template([b"a", b"b", b"c"], [request_id, lambda _: b""]).render(exchange) is None
