"""With Hypothesis, against a real gateway process: no header, query string, JSON body (nested
objects and arrays, unicode, huge numbers, deep nesting) or XML body makes the `transform` policy
fail the exchange. The gateway always answers (a 4xx where the input is bad, never a 5xx of its
own), what reaches the upstream is well-formed (JSON where the route converts XML), and what the
client gets back is well-formed JSON or XML. The pure functions get many more examples in
tests/test_transform_xml.py; these keep to a sample so the file runs in well under a minute."""

from __future__ import annotations

import json
import string
from typing import Any
from urllib.parse import quote

import pytest
from defusedxml.ElementTree import fromstring
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.proxy_http import RawConnection, find_request, running_gateway
from tests.support.upstream import UpstreamServer
from tests.test_transform_xml import JSON_DOCUMENTS

TRANSFORM = {
    "request": {
        "headers": {"set": {"X-Tenant": "${tenant_id}"}, "rename": {"X-Old": "X-New"}},
        "query": {"remove": ["debug"], "rename": {"q": "search"}, "set": {"v": "2"}},
        "body": {"remove": ["secret", "items[*].secret"], "set": {"meta.via": "gw"}, "max_size": "8KB"},
    },
    "response": {
        "body": {"remove": ["headers.host", "items[*].price"], "set": {"served": True}, "max_size": "8KB"},
    },
    "xml": {"root": "doc", "max_size": "8KB"},
}
SAMPLE = settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))

_HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
_QUERY_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "%&=+;/?:@-._~!$'()*,", max_size=60)
_ACCEPT = st.sampled_from(
    [None, "application/xml", "text/xml", "*/*", "application/json", "application/xml;q=0.5, */*;q=0.1"]
)
_XML_PIECES = st.sampled_from(
    [
        "<doc>", "</doc>", "<a>", "</a>", "<b/>", "x", "\u017c", "&amp;", "&#x1F600;", "&lol;", " id='1'",
        '<!DOCTYPE doc [<!ENTITY lol "lol">]>', '<?xml version="1.0" encoding="UTF-8"?>', "<![CDATA[<]]>",
        "<!-- c -->", "<", "\x00", "<_xD800_>", "</_xD800_>",
    ]
)  # fmt: skip


def _deep(depth: int, leaf: Any) -> Any:
    document = leaf
    for level in range(depth):
        document = {"a": document} if level % 2 else [document]
    return document


DOCUMENTS = JSON_DOCUMENTS | st.builds(
    _deep, st.integers(min_value=50, max_value=400), st.integers(min_value=-(10**30), max_value=10**30)
)


@pytest.fixture(scope="module")
def gateway(shared_upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory):
    config = {
        "routes": [
            {
                "name": "prop",
                "path": "/p/*",
                "target": shared_upstream.url,
                "strip_prefix": True,
                "policies": {"transform": TRANSFORM},
            }
        ]
    }
    with running_gateway(tmp_path_factory.mktemp("properties"), config) as gw:
        yield gw


def _body(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _well_formed(content_type: str | None, body: bytes) -> None:
    if content_type is not None and "xml" in content_type:
        fromstring(body)
    elif content_type == "application/json":
        json.loads(body)


@SAMPLE
@given(header=_HEADER_TEXT, query=_QUERY_TEXT, document=DOCUMENTS)
def test_no_request_makes_the_exchange_fail(
    gateway, shared_upstream: UpstreamServer, header: str, query: str, document: Any
) -> None:
    body = _body(document)
    headers = {
        "X-Old": header.strip() or "v",
        "X-Any": header.strip() or "v",
        "Content-Type": "application/json",
    }
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("POST", "/p/echo" + ("?" + query if query else ""), headers, body)
        assert response.status < 500, (response.status, response.body[:200])
    if response.status != 200:
        return
    seen = find_request(shared_upstream, response.header("x-request-id"))
    if len(body) <= 8000:
        sent = json.loads(seen.body)  # well-formed JSON reached the upstream
        if isinstance(sent, dict) and sent != document:
            assert "secret" not in sent and sent["meta"] == {"via": "gw"}
    assert "debug=" not in seen.query.split("&")


@SAMPLE
@given(document=DOCUMENTS, accept=_ACCEPT, chunked=st.booleans())
def test_no_json_response_makes_the_exchange_fail(
    gateway, document: Any, accept: str | None, chunked: bool
) -> None:
    body = _body(document)
    headers = {"Content-Type": "application/octet-stream"}
    if accept is not None:
        headers["Accept"] = accept
    target = "/p/made?body=request&type=application/json" + ("&framing=chunked" if chunked else "")
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("POST", target, headers, body)
        assert response.status == 200, (response.status, response.body[:200])
        assert conn.exchange("GET", "/p/status/204").status == 204  # the connection goes on
    if response.body != body:
        _well_formed(response.header("content-type"), response.body)
    if response.header("content-length") is not None:
        assert int(response.header("content-length")) == len(response.body)


@SAMPLE
@given(
    pieces=st.lists(_XML_PIECES, max_size=20),
    raw=st.binary(max_size=40),
    content_type=st.sampled_from(["application/xml", "text/xml; charset=utf-8", "application/soap+xml"]),
)
def test_no_xml_request_makes_the_exchange_fail(
    gateway, shared_upstream: UpstreamServer, pieces: list[str], raw: bytes, content_type: str
) -> None:
    for body in ("".join(pieces).encode("utf-8"), raw):
        with RawConnection(gateway.port) as conn:
            response = conn.exchange("POST", "/p/echo", {"Content-Type": content_type}, body)
        assert response.status in (200, 400), (response.status, response.body[:200])
        if response.status == 400:
            assert response.json()["reason"].startswith("xml_")
        elif body:
            seen = find_request(shared_upstream, response.header("x-request-id"))
            assert seen.header("content-type") == "application/json"
            json.loads(seen.body)


def test_a_query_string_is_sent_as_edited(gateway, shared_upstream: UpstreamServer) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", "/p/echo?q=" + quote("a b") + "&debug=1&keep=%C5%BC")
    seen = find_request(shared_upstream, response.header("x-request-id"))
    assert seen.query == "search=a%20b&keep=%C5%BC&v=2"
