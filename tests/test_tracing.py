"""W3C trace context through a real gateway: the upstream always gets a traceparent (the client's
trace, or a new one), tracestate passes untouched, and the client learns the trace id from
traceresponse, on proxied answers and on the gateway's own."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from apigate.engine.tracing import TraceIds, parse_traceparent
from apigate.engine.wire import HexCounter, RequestIds
from tests.support.errors_helpers import request
from tests.support.gateway import GatewayProcess
from tests.support.upstream import UpstreamServer

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, UpstreamServer]]:
    upstream = UpstreamServer().start()
    config = {
        "tracing": {"sample_ratio": 0.25},
        "routes": [{"path": "/echo/*", "target": upstream.url}],
    }
    gateway = GatewayProcess(tmp_path_factory.mktemp("tracing"), config).start()
    yield gateway, upstream
    gateway.stop()
    upstream.stop()


def _send(env: tuple[GatewayProcess, UpstreamServer], headers: list[tuple[str, str]]) -> tuple[str, str, str]:
    """(the upstream's traceparent, its tracestate or "", the client's traceresponse)."""
    gateway, upstream = env
    before = len(upstream.requests)
    response = request(gateway.port, "GET", "/echo/x", headers=headers)
    assert response.status == 200
    seen = upstream.requests[before]
    return (
        seen.header("traceparent") or "",
        seen.header("tracestate") or "",
        response.header("traceresponse") or "",
    )


def test_a_new_trace_is_started_and_named_to_the_client(env: tuple[GatewayProcess, UpstreamServer]) -> None:
    _gateway, upstream = env
    sent, _state, answered = _send(env, [])
    upstream_side = TRACEPARENT.fullmatch(sent)
    client_side = TRACEPARENT.fullmatch(answered)
    assert upstream_side and client_side
    assert upstream_side[1] == client_side[1]  # one trace
    assert upstream_side[2] != client_side[2]  # the upstream call is a span of its own
    assert upstream_side[3] == client_side[3]
    # The trace id of a new trace is the request id the gateway made.
    assert upstream.requests[-1].header("x-request-id") == upstream_side[1]


def test_the_clients_trace_continues(env: tuple[GatewayProcess, UpstreamServer]) -> None:
    for flags in ("01", "00"):
        headers = [
            ("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-{flags}"),
            ("tracestate", "vendor=a,other=b"),
        ]
        sent, state, answered = _send(env, headers)
        upstream_side = TRACEPARENT.fullmatch(sent)
        client_side = TRACEPARENT.fullmatch(answered)
        assert upstream_side and client_side
        assert upstream_side[1] == client_side[1] == CLIENT_TRACE
        assert CLIENT_SPAN not in (upstream_side[2], client_side[2])
        assert upstream_side[3] == client_side[3] == flags  # the client's sampling decision stands
        assert state == "vendor=a,other=b"


@pytest.mark.parametrize(
    "invalid",
    [
        f"00-{'0' * 32}-{CLIENT_SPAN}-01",  # all-zero trace id
        f"00-{CLIENT_TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01",  # version ff
        f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01",  # upper case
        f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra",  # version 00 has four fields
        f"00-{CLIENT_TRACE[:-1]}-{CLIENT_SPAN}-01",
        "garbage",
    ],
)
def test_an_invalid_traceparent_starts_a_new_trace(
    env: tuple[GatewayProcess, UpstreamServer], invalid: str
) -> None:
    sent, _state, answered = _send(env, [("traceparent", invalid)])
    upstream_side = TRACEPARENT.fullmatch(sent)
    assert upstream_side and upstream_side[1] != CLIENT_TRACE and invalid not in sent
    assert TRACEPARENT.fullmatch(answered)


def test_a_later_version_is_read_by_its_first_four_fields() -> None:
    assert parse_traceparent(f"01-{CLIENT_TRACE}-{CLIENT_SPAN}-03-more".encode()) == (
        CLIENT_TRACE.encode(),
        CLIENT_SPAN.encode(),
        True,
    )


def test_new_traces_are_sampled_at_the_configured_ratio(env: tuple[GatewayProcess, UpstreamServer]) -> None:
    flags = [TRACEPARENT.fullmatch(_send(env, [])[0])[3] for _ in range(40)]  # type: ignore[index]
    assert flags.count("01") == 10  # a quarter, exactly: one process, one accumulator


def test_the_gateways_own_answers_name_the_trace(env: tuple[GatewayProcess, UpstreamServer]) -> None:
    gateway, _upstream = env
    response = request(
        gateway.port, "GET", "/nowhere", headers=[("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")]
    )
    assert response.status == 404
    found = TRACEPARENT.fullmatch(response.header("traceresponse") or "")
    assert found and found[1] == CLIENT_TRACE and found[3] == "01"


def test_span_ids_are_unique_and_never_zero(tmp_path: Path) -> None:
    ids = TraceIds()
    made = [ids.span_id() for _ in range(10_000)]
    assert len(set(made)) == len(made)
    assert all(len(span) == 16 and span != b"0" * 16 for span in made)
    ids.ratio = 0.01
    assert sum(ids.sample() for _ in range(1000)) == 10


def test_hex_counters_give_each_number_its_own_fixed_width_digits() -> None:
    # Across block boundaries (the leading digits are formatted once per 4,096 numbers).
    mask = 0xFEDCBA9876543210F
    counter = HexCounter(b"id-", 15, mask)
    made = [counter.next() for _ in range(3 * 4096 + 5)]
    assert made == [b"id-%015x" % ((mask ^ n) & (2**60 - 1)) for n in range(1, len(made) + 1)]
    assert len(set(made)) == len(made)
    ids = RequestIds()
    first, second = ids.next(), ids.next()
    assert len(first) == 32 and first[:16] == second[:16] and int(second, 16) == int(first, 16) + 1
