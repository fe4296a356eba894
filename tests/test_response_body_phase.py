"""The engine's response_body phase: policies that filter the response body as it streams, the
client's framing that follows a changed length, filters chained in the order the response meets
the policies, a filter that gives up, failures, and the responses that have no body."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from apigate.config.compile import compile_plan
from apigate.config.loader import load_config
from apigate.engine.exchange import finish_filters
from apigate.engine.upstream import PoolManager
from tests.support.proxy_http import RawConnection, running_gateway
from tests.support.response_body_policies import UpperFilter, WrapFilter
from tests.support.upstream import made_body

REPO = Path(__file__).resolve().parent.parent
# The plugin module is imported from the repository; apigate from wherever it is already found.
PLUGIN_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
PLUGINS = ["tests.support.response_body_policies"]


def _route(path: str, target: str, policies: dict) -> dict:
    return {"path": f"/{path}/*", "target": target, "rewrite": "/made", "policies": policies}


@pytest.fixture(scope="module")
def gateway(shared_upstream, tmp_path_factory):
    url = shared_upstream.url
    terminated = {"request-termination": {"status": 503, "message": "closed for maintenance"}}
    config = {
        "plugins": PLUGINS,
        "routes": [
            _route("upper", url, {"test_response_upper": None}),
            _route("wrap", url, {"test_response_wrap": {"limit": 1000}}),
            _route("chain", url, {"test_response_upper": None, "test_response_wrap": {"limit": 1000}}),
            _route("fail-hook", url, {"test_response_failing": {"where": "hook"}}),
            _route("fail-feed", url, {"test_response_failing": {"where": "feed", "after": 100_000}}),
            _route("fail-end", url, {"test_response_failing": {"where": "end"}}),
            _route("plain", url, {}),
            _route("held", url, {"test_response_wrap": {"limit": 1000, "hold": True}}),
            _route("held-fail", url, {"test_response_failing": {"where": "end", "hold": True}}),
            {"path": "/answered-upper", "policies": {**terminated, "test_response_upper": None}},
            {"path": "/answered-wrap", "policies": {**terminated, "test_response_wrap": {"limit": 1000}}},
            {
                "path": "/answered-broken",
                "policies": {**terminated, "test_response_failing": {"where": "end"}},
            },
        ],
    }
    with running_gateway(tmp_path_factory.mktemp("gw"), config, env=PLUGIN_ENV) as gw:
        yield gw


def test_a_filter_that_keeps_the_length_keeps_content_length(gateway) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", "/upper/x?size=5000")
        assert response.status == 200
        assert response.header("content-length") == "5000"
        assert not response.chunked
        assert response.header("x-filter-asked") == "upper"
        assert response.body == made_body(5000).upper()
        assert conn.exchange("GET", "/upper/x?size=10").body == made_body(10).upper()  # keep-alive


def test_a_changed_length_goes_chunked_to_an_http11_client(gateway) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", "/wrap/x?size=500")
        assert response.status == 200
        assert response.chunked and response.header("content-length") is None
        assert response.body == b"<500>" + made_body(500) + b"</>"
        # The connection carries the next exchange: the chunked body was ended properly.
        assert conn.exchange("GET", "/plain/x?size=7").body == made_body(7)


def test_a_changed_length_is_delimited_by_the_close_for_an_http10_client(gateway) -> None:
    with RawConnection(gateway.port) as conn:
        conn.send(b"GET /wrap/x?size=500 HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n")
        head = conn.read_head()
        assert head.status == 200
        assert head.header("content-length") is None and head.header("transfer-encoding") is None
        assert head.header("connection") == "close"
        assert conn.read_to_eof() == b"<500>" + made_body(500) + b"</>"


@pytest.mark.parametrize("framing", ["chunked", "eof"])
def test_chunked_and_close_delimited_upstream_bodies_are_filtered(gateway, framing: str) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", f"/wrap/x?size=700&framing={framing}")
        assert response.status == 200 and response.chunked
        assert response.body == b"<700>" + made_body(700) + b"</>"
        assert conn.exchange("GET", f"/upper/x?size=9000&framing={framing}").body == made_body(9000).upper()


def test_a_filter_that_needs_the_whole_body_gives_up_past_its_limit(gateway) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", "/wrap/x?size=300000")
        assert response.status == 200 and response.chunked
        assert response.body == made_body(300_000)  # what it held, then the rest, unchanged


def test_filters_chain_in_the_order_the_response_meets_the_policies(gateway) -> None:
    """Response hooks run in reverse order: upper-case (order 5000) filters first, then the wrap
    (order 4000) sees what it made."""
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", "/chain/x?size=600")
        assert response.body == b"<600>" + made_body(600).upper() + b"</>"
        assert response.header("x-filter-asked") == "upper"
        assert conn.exchange("GET", "/chain/x?size=70000").body == made_body(70_000).upper()


@pytest.mark.parametrize(
    ("method", "query"), [("HEAD", "size=100"), ("GET", "status=204"), ("GET", "status=304&size=100")]
)
def test_a_response_without_a_body_gets_no_filter(gateway, method: str, query: str) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange(method, f"/upper/x?{query}")
        assert response.status in (200, 204, 304)
        assert response.header("x-filter-asked") is None
        assert response.body == b""
        # Nothing was left on the connection: the next answer is read cleanly.
        assert conn.exchange("GET", "/upper/x?size=3").header("x-filter-asked") == "upper"


def test_a_failing_hook_is_a_500_before_anything_went(gateway) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", "/fail-hook/x?size=100")
        assert response.status == 500
        assert "policy failed" in response.json()["error"]
        assert conn.exchange("GET", "/plain/x?size=5").status == 200


@pytest.mark.parametrize("route", ["fail-feed", "fail-end"])
def test_a_failing_filter_cuts_the_response(gateway, route: str) -> None:
    with RawConnection(gateway.port) as conn:
        conn.send(conn.request("GET", f"/{route}/x?size=300000"))
        head = conn.read_head()
        assert head.status == 200 and head.header("transfer-encoding") == "chunked"
        rest = conn.read_to_eof()  # the gateway closes: no last chunk ever comes
        assert not rest.endswith(b"0\r\n\r\n")
        assert conn.eof


def test_a_gateway_answer_is_filtered_whole_with_its_own_length(gateway) -> None:
    with RawConnection(gateway.port) as conn:
        upper = conn.exchange("GET", "/answered-upper")
        assert upper.status == 503
        assert upper.header("content-type") == "application/json"
        assert upper.body.startswith(b'{"ERROR":"CLOSED FOR MAINTENANCE"')
        wrapped = conn.exchange("GET", "/answered-wrap")
        assert wrapped.status == 503 and not wrapped.chunked
        assert int(wrapped.header("content-length")) == len(wrapped.body)
        size, _, rest = wrapped.body.removeprefix(b"<").partition(b">")
        assert rest.endswith(b"</>") and int(size) == len(rest) - len(b"</>")
        assert b"closed for maintenance" in rest
        # A failing filter leaves the answer as it was: the client still gets a whole answer.
        broken = conn.exchange("GET", "/answered-broken")
        assert broken.status == 503 and b"closed for maintenance" in broken.body
        assert int(broken.header("content-length")) == len(broken.body)


def test_a_route_without_the_phase_has_no_response_body_hooks() -> None:
    loop = asyncio.new_event_loop()
    try:
        config = load_config(
            text="plugins: [tests.support.response_body_policies]\nroutes:\n"
            "  - {path: /plain, target: 'http://127.0.0.1:9', policies: {headers: {}}}\n"
            "  - {path: /both, target: 'http://127.0.0.1:9', policies: "
            "{test_response_upper: null, test_response_wrap: null}}\n",
            environ={},
        )
        plain, both = compile_plan(config, PoolManager(loop)).routes
    finally:
        loop.close()
    assert plain.response_body_hooks == ()
    # Reverse order, as the response hooks: test_response_upper (5000) first, the wrap (4000) next.
    assert [hook.__self__.name for hook in both.response_body_hooks] == [
        "test_response_upper",
        "test_response_wrap",
    ]


def test_finish_filters_feeds_each_rest_through_the_filters_after_it() -> None:
    wrap = WrapFilter(limit=100)
    assert wrap.feed(b"ab") == b""
    # The upper filter ends with nothing of its own; the wrap then ends with what it held.
    assert finish_filters([UpperFilter(), wrap], b"cd") == b"<4>abCD</>"
    assert finish_filters([UpperFilter()], b"") == b""


@pytest.mark.parametrize("framing", ["length", "chunked", "eof"])
def test_a_held_head_goes_with_the_whole_filtered_body_and_its_length(gateway, framing: str) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", f"/held/x?size=500&framing={framing}")
        assert response.status == 200 and not response.chunked
        assert response.body == b"<500>" + made_body(500) + b"</>"
        assert response.header("content-length") == str(len(response.body))
        assert conn.exchange("GET", "/plain/x?size=7").body == made_body(7)  # the connection goes on


def test_a_held_head_goes_as_it_was_when_the_filter_gives_up(gateway) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", "/held/x?size=300000")
        assert response.status == 200 and not response.chunked
        assert response.header("content-length") == "300000"  # the upstream's: the bytes are its own
        assert response.body == made_body(300_000)
        chunked = conn.exchange("GET", "/held/x?size=300000&framing=chunked")
        assert chunked.chunked and chunked.body == made_body(300_000)


def test_a_filter_failing_while_it_holds_the_head_is_a_502(gateway) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", "/held-fail/x?size=1000")
        assert response.status == 502
        assert response.json()["reason"] == "response_filter_failed"
        assert conn.exchange("GET", "/plain/x?size=5").status == 200
