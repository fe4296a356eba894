"""The access log's line is JSON text made by hand (for speed), so whatever a request carries
(paths, ids, claims, a plugin's values) must come out as one line of valid JSON holding exactly
those values: checked here with Hypothesis against the values the exchange was given."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apigate.config.accesslog import FIELDS
from apigate.config.loader import load_config
from apigate.observe.accesslog.hotpath import LineBuffer
from apigate.observe.accesslog.lines import LineMaker
from tests.support.exchanges import request_exchange

# Any text, lone surrogates included (a JWT claim decoded by the standard library may hold one);
# "eyJ" is left out because a path holding it is redacted (tested in test_access_log.py).
ANY_TEXT = st.text(max_size=40).filter(lambda text: "eyJ" not in text)
# Ids as the engine keeps them: printable ASCII without quote or backslash (engine/exchange.py).
PRINTABLE_ID = st.binary(min_size=1, max_size=40).map(
    lambda raw: bytes(33 + b % 94 for b in raw).replace(b'"', b"'").replace(b"\\", b"/")
)
OPTIONAL_TEXT = st.none() | ANY_TEXT
EXCHANGES = st.fixed_dictionaries(
    {
        "path": ANY_TEXT.map(lambda text: "/" + text),
        "method": st.sampled_from(["GET", "POST", "DELETE", "PROPFIND"]),
        "client_ip": st.sampled_from(["127.0.0.1", "::1", "203.0.113.9"]) | ANY_TEXT,
        "rid": PRINTABLE_ID,
        "trace_id": st.none() | PRINTABLE_ID,
        "status": st.integers(0, 599),
        "duration": st.floats(0, 100_000, allow_nan=False),
        "upstream": st.none() | st.floats(0, 100, allow_nan=False),
        "bytes_in": st.integers(0, 2**40),
        "bytes_out": st.integers(0, 2**40),
        "attempt": st.integers(0, 10),
        "consumer": OPTIONAL_TEXT,
        "tenant": OPTIONAL_TEXT,
        "key_id": OPTIONAL_TEXT,
        "sub": OPTIONAL_TEXT,
        "limited": OPTIONAL_TEXT,
        "cache": OPTIONAL_TEXT,
        "tried": st.none() | st.lists(ANY_TEXT, min_size=1, max_size=3),
        "failure": OPTIONAL_TEXT,
    }
)


def made(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """An exchange holding ``values``, and the line's fields they must give."""
    exchange = request_exchange([(b"host", b"gateway.test")], path=values["path"], method=values["method"])
    exchange.client_ip = values["client_ip"]
    exchange.rid = values["rid"]
    exchange.trace_id = values["trace_id"] or exchange.rid
    exchange.response_status = values["status"]
    exchange.t_end = exchange.t_start + values["duration"]
    exchange.bytes_in, exchange.bytes_out = values["bytes_in"], values["bytes_out"]
    exchange.attempt = values["attempt"]
    exchange.consumer = values["consumer"]
    exchange.tenant = values["tenant"]
    exchange.tried = values["tried"]
    exchange.failure = values["failure"]
    if values["upstream"] is not None:
        exchange.t_attempt = exchange.t_start
        exchange.t_first_byte = exchange.t_start + values["upstream"]
    state = exchange.vars()
    for name in ("key_id", "limited", "cache"):
        if values[name] is not None:
            state[name] = values[name]
    if values["sub"] is not None:
        state["claims"] = {"sub": values["sub"]}
    rid = values["rid"].decode()
    expected: dict[str, Any] = {
        "request_id": rid,
        "trace_id": values["trace_id"].decode() if values["trace_id"] else rid,
        "client_ip": values["client_ip"],
        "method": values["method"],
        "path": values["path"],
        "status": values["status"],
        # (from the times as the exchange holds them: start + duration - start is not duration)
        "duration_ms": millis(exchange.t_end - exchange.t_start),
        "bytes_in": values["bytes_in"],
        "bytes_out": values["bytes_out"],
        "attempts": values["attempt"],
        "upstream_ms": (
            None if values["upstream"] is None else millis(exchange.t_first_byte - exchange.t_attempt)
        ),
        "consumer": values["consumer"],
        "tenant": values["tenant"],
        "key_id": values["key_id"],
        "user_id": None if values["sub"] is None else values["sub"][:256],
        "limited": values["limited"],
        "cache": values["cache"],
        "tried": values["tried"],
        "error": values["failure"],
    }
    return exchange, expected


def millis(seconds: float) -> float:
    """Milliseconds to the microsecond, as a line has them."""
    return int(seconds * 1_000_000.0) / 1000


def one_line(exchange: Any, **access_log: Any) -> dict[str, Any]:
    """The line a LineMaker with ``access_log`` settings writes for ``exchange``, parsed."""
    config = load_config(text=orjson.dumps({"access_log": access_log}).decode()).access_log
    sent: list[bytes] = []
    LineMaker(config, LineBuffer(1, lambda data, count: sent.append(data)))(exchange)
    [line] = sent
    # One line: a newline inside a value would let a request forge lines of its own.
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and b"\r" not in line
    parsed: dict[str, Any] = json.loads(line.decode("utf-8"))  # valid JSON and UTF-8 (strict)
    return parsed


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=EXCHANGES)
def test_every_value_comes_out_as_it_went_in(values: dict[str, Any]) -> None:
    exchange, expected = made(values)
    line = one_line(exchange)
    assert next(iter(line)) == "time"
    logged = datetime.strptime(line.pop("time"), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(logged.timestamp() - time.time()) < 5.0  # the exchange began just now
    assert line == {name: value for name, value in expected.items() if value is not None}
    assert list(line) == [name for name in FIELDS if name in line]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=EXCHANGES)
def test_with_nulls_kept_every_field_is_there_in_order(values: dict[str, Any]) -> None:
    exchange, expected = made(values)
    line = one_line(exchange, omit_empty=False)
    assert tuple(line) == FIELDS
    del line["time"]
    assert line == {**expected, "route": None, "upstream": None}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=EXCHANGES, chosen=st.lists(st.sampled_from(FIELDS[1:]), min_size=1, unique=True))
def test_chosen_fields_come_in_their_order(values: dict[str, Any], chosen: list[str]) -> None:
    exchange, expected = made(values)
    line = one_line(exchange, fields=chosen)
    assert line == {name: expected[name] for name in chosen if expected.get(name) is not None}
    assert list(line) == [name for name in chosen if name in line]


def test_a_lone_surrogate_in_a_path_or_a_claim_is_escaped() -> None:
    exchange = request_exchange([(b"host", b"gateway.test")], path="/ab")
    exchange.path = "/a\ud800b"  # (as a path decoded with surrogateescape would hold it)
    exchange.response_status = 200
    exchange.vars()["claims"] = {"sub": "u\udc00"}
    line = one_line(exchange)
    assert (line["path"], line["user_id"]) == ("/a\ud800b", "u\udc00")
