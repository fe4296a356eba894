"""The `transform` policy's response body mapping and its JSON/XML negotiation, end to end: a
real gateway process in front of the real upstream, whose ``/made?body=request`` answers with the
request's own body, so each test chooses the JSON the upstream sends back, its framing
(length, chunks, the close) and its fields (ETag, Content-Encoding).

Nested fields and arrays mapped on responses, the head that goes with the body (an exact
Content-Length, a weakened ETag; the upstream's own head when nothing changed), bodies over the
limit, malformed or not JSON or compressed passing unchanged and counted, compression after the
mapping; XML for clients that ask for it, XML request bodies sent upstream as JSON, and the XML
that is refused (a billion-laughs document, external entities, attributes, oversized bodies);
the counts as Prometheus shows them, merged across two workers; `apigate check` on bad settings.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from defusedxml.ElementTree import fromstring
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cli import check_problems
from tests.support.errors_helpers import wait_until
from tests.support.inprocess import InProcessGateway
from tests.support.proxy_http import RawConnection, find_request, running_gateway
from tests.support.upstream import UpstreamServer

RESPONSE_MAP = {
    "remove": ["user.internal_id", "items[*].cost"],
    "rename": {"user.name": "full_name"},
    "move": {"legacy.id": "id"},
    "copy": {"user.email": "contact.email"},
    "set": {"meta.served_by": "gateway", "items[*].currency": "EUR"},
    "max_size": "2KB",
}
DOCUMENT = {
    "user": {"internal_id": 7, "name": "Ada", "email": "ada@example.com"},
    "items": [{"id": 1, "cost": 3, "tags": ["a"]}, {"id": 2, "cost": 4, "tags": []}],
    "legacy": {"id": "L-1"},
    "note": "\u017c\u00f3\u0142w \U0001f600",
    "big": 123456789012345678901234567890,
}
MAPPED = {
    "user": {"full_name": "Ada", "email": "ada@example.com"},
    "items": [
        {"id": 1, "tags": ["a"], "currency": "EUR"},
        {"id": 2, "tags": [], "currency": "EUR"},
    ],
    "legacy": {},
    "note": "\u017c\u00f3\u0142w \U0001f600",
    "big": 123456789012345678901234567890,
    "id": "L-1",
    "contact": {"email": "ada@example.com"},
    "meta": {"served_by": "gateway"},
}
XML = {"root": "order", "max_size": "1KB"}


def route(name: str, target: str, transform: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "path": f"/{name}/*",
        "target": target,
        "strip_prefix": True,
        "policies": {"transform": transform, **extra},
    }


@pytest.fixture(scope="module")
def gateway(shared_upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory):
    url = shared_upstream.url
    config = {
        "routes": [
            route("map", url, {"response": {"body": RESPONSE_MAP}}),
            route("gz", url, {"response": {"body": RESPONSE_MAP}}, compression={"min_size": 10}),
            route(
                "cached",
                url,
                {"response": {"body": {"set": {"via": "gw"}}}, "xml": {}},
                cache={"ttl": "60s"},
            ),
            route(
                "xml",
                url,
                {
                    "request": {"body": {"remove": ["secret"]}},
                    "response": {"body": {"remove": ["user.internal_id"]}},
                    "xml": XML,
                },
            ),
        ]
    }
    with running_gateway(tmp_path_factory.mktemp("bodies"), config) as gw:
        yield gw


def answered(port: int, path: str, document: Any = None, raw: bytes | None = None, **query: str) -> Any:
    """POST ``document`` (or ``raw``) to ``path`` with the upstream echoing it back as JSON: each
    ``query`` item becomes a /made argument (framing=chunked, h=etag:"v1"...), ``accept`` and
    ``via10`` (an HTTP/1.0 request) aside."""
    accept = query.pop("accept", None)
    body = raw if raw is not None else _dumps(document)
    args = {"body": "request", "type": "application/json", **query}
    target = f"{path}/made?" + "&".join(f"{k}={quote(v)}" for k, v in args.items() if k != "h")
    if "h" in query:
        target += "&" + "&".join(f"h={quote(h)}" for h in query["h"].split("|"))
    headers = {"Content-Type": "application/octet-stream"}
    if accept is not None:
        headers["Accept"] = accept
    with RawConnection(port) as conn:
        return conn.exchange("POST", target, headers, body)


def _json(body: bytes) -> Any:
    return json.loads(body)  # the standard library: integers of any size


def _dumps(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode()


# -- the response body mapping -------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked", "eof"])
def test_nested_fields_and_arrays_are_mapped_with_an_exact_length(gateway, framing: str) -> None:
    response = answered(gateway.port, "/map", DOCUMENT, framing=framing, h='etag:"v1"|accept-ranges:bytes')
    assert response.status == 200
    assert _json(response.body) == MAPPED
    assert list(_json(response.body)["user"]) == ["full_name", "email"]  # renamed in place
    assert response.header("content-length") == str(len(response.body))
    assert not response.chunked
    assert response.header("etag") == 'W/"v1"'  # the bytes changed: the validator is weak now
    assert response.header("accept-ranges") is None
    assert response.header("content-type") == "application/json"


def test_a_body_the_mapping_does_not_change_keeps_the_upstreams_head(gateway) -> None:
    document = {"other": [1, 2, {"x": None}]}
    response = answered(gateway.port, "/map", raw=orjson.dumps(document), h='etag:"v2"')
    # set adds its fields whatever the document: so this one changes; an unread one does not.
    assert _json(response.body)["meta"] == {"served_by": "gateway"}
    plain = answered(gateway.port, "/map", raw=b'{"x": 1}', type="text/plain", h='etag:"v3"')
    assert plain.body == b'{"x": 1}' and plain.header("etag") == '"v3"'
    assert plain.header("content-length") == "8"


def test_an_http10_client_gets_the_mapped_body_with_its_length(gateway) -> None:
    body = _dumps(DOCUMENT)
    with RawConnection(gateway.port) as conn:
        conn.send(
            b"POST /map/made?body=request&type=application/json&framing=chunked HTTP/1.0\r\n"
            b"Host: t\r\nConnection: keep-alive\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        response = conn.read_response("POST")
        assert response.status == 200 and _json(response.body) == MAPPED
        assert response.header("content-length") == str(len(response.body))
        assert response.header("connection") == "keep-alive"  # framed by its length: the connection stays


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_over_the_limit_passes_unchanged(gateway, framing: str) -> None:
    document = {**DOCUMENT, "padding": "p" * 3000}  # over max_size (2 KB)
    body = _dumps(document)
    response = answered(gateway.port, "/map", raw=body, framing=framing, h='etag:"big"')
    assert response.status == 200
    assert response.body == body  # byte for byte
    assert response.header("etag") == '"big"'  # the upstream's own head
    if framing == "length":
        assert response.header("content-length") == str(len(body))


@pytest.mark.parametrize(
    ("raw", "query"),
    [
        (b'{"user": {"internal_id": 1}', {}),  # malformed
        (b'{"user": NaN}', {}),
        (b"\xff\xfe{}", {}),
        (_dumps(DOCUMENT), {"type": "text/plain"}),
        (gzip.compress(orjson.dumps({"user": {"internal_id": 1}}), mtime=0), {"h": "content-encoding:gzip"}),
    ],
    ids=["malformed", "nan", "not-utf8", "not-json", "gzip"],
)
def test_bodies_the_mapping_cannot_read_pass_unchanged(gateway, raw: bytes, query: dict[str, str]) -> None:
    response = answered(gateway.port, "/map", raw=raw, framing="chunked", **query)
    assert response.status == 200
    assert response.body == raw


def test_the_mapped_body_is_what_compression_compresses(gateway) -> None:
    body = _dumps(DOCUMENT)
    with RawConnection(gateway.port) as conn:
        response = conn.exchange(
            "POST",
            "/gz/made?body=request&type=application/json&framing=chunked",
            {"Content-Type": "application/octet-stream", "Accept-Encoding": "gzip"},
            body,
        )
    assert response.header("content-encoding") == "gzip"
    assert response.header("content-length") == str(len(response.body))  # the compressed bytes' length
    assert _json(gzip.decompress(response.body)) == MAPPED


def test_the_gateways_own_errors_are_mapped_as_json_bodies_of_the_route(gateway) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", "/map/status/503")  # the upstream's JSON 503
    assert response.status == 503
    assert _json(response.body) == {"status": 503, "meta": {"served_by": "gateway"}}


# -- JSON and XML --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "answered_as"),
    [("application/xml", "application/xml"), ("text/xml, application/json;q=0.5", "text/xml")],
)
def test_a_client_that_asks_for_xml_gets_xml(gateway, accept: str, answered_as: str) -> None:
    response = answered(gateway.port, "/xml", DOCUMENT, accept=accept, framing="chunked", h='etag:"v1"')
    assert response.status == 200
    assert response.header("content-type") == f"{answered_as}; charset=utf-8"
    assert response.header("content-length") == str(len(response.body))
    assert response.header("etag") is None  # another representation: the upstream's validator is not its own
    assert "Accept" in response.header("vary")
    root = fromstring(response.body)
    assert root.tag == "order"
    assert [child.tag for child in root] == ["user", "items", "items", "legacy", "note", "big"]
    assert root.findtext("user/name") == "Ada" and root.find("user/internal_id") is None
    assert root.findtext("note") == DOCUMENT["note"]
    assert root.findtext("big") == "123456789012345678901234567890"
    assert [item.findtext("tags") for item in root.findall("items")] == ["a", None]


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "application/json, application/xml"])
def test_other_clients_get_the_json(gateway, accept: str | None) -> None:
    query = {} if accept is None else {"accept": accept}
    response = answered(gateway.port, "/xml", DOCUMENT, **query)
    assert response.header("content-type") == "application/json"
    assert _json(response.body)["user"] == {"name": "Ada", "email": "ada@example.com"}
    assert "Accept" in response.header("vary")


def test_json_too_large_to_convert_goes_as_json(gateway) -> None:
    body = orjson.dumps({"padding": "p" * 2000})  # over xml.max_size (1 KB)
    response = answered(gateway.port, "/xml", raw=body, accept="application/xml", framing="chunked")
    assert response.header("content-type") == "application/json"
    assert response.body == body


def test_an_xml_request_reaches_a_json_upstream_as_json(gateway, shared_upstream) -> None:
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<order>\n  <secret>s</secret>\n'
        b"  <line><sku>a</sku></line>\n  <line><sku>b</sku><qty>2</qty></line>\n"
        b"  <name>\xc5\xbc\xc3\xb3\xc5\x82w</name>\n  <note/>\n</order>"
    )
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("POST", "/xml/echo", {"Content-Type": "text/xml; charset=utf-8"}, body)
    assert response.status == 200
    seen = find_request(shared_upstream, response.header("x-request-id"))
    assert seen.header("content-type") == "application/json"
    assert seen.header("content-length") == str(len(seen.body))
    assert orjson.loads(seen.body) == {
        "line": [{"sku": "a"}, {"sku": "b", "qty": "2"}],
        "name": "\u017c\u00f3\u0142w",
        "note": None,
    }  # and request.body's mapping removed the secret


def test_the_billion_laughs_document_is_refused_without_expanding_it(gateway, shared_upstream) -> None:
    from tests.test_transform_xml import BILLION_LAUGHS, EXTERNAL_ENTITY

    for body in (BILLION_LAUGHS, EXTERNAL_ENTITY):
        with RawConnection(gateway.port) as conn:
            response = conn.exchange("POST", "/xml/echo", {"Content-Type": "application/xml"}, body)
            assert response.status == 400
            assert response.json()["reason"] == "xml_dtd"
            assert "never read or expanded" in response.json()["error"]
            assert conn.exchange("GET", "/xml/status/200").status == 200  # the connection goes on
        with pytest.raises(AssertionError):
            find_request(shared_upstream, response.header("x-request-id"), timeout=0.2)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<order><a>1</a>", "xml_malformed"),
        (b'<order id="7"/>', "xml_attributes"),
        (b"<order>t<a/></order>", "xml_mixed"),
    ],
)
def test_xml_that_cannot_be_converted_is_a_400_that_says_why(gateway, body: bytes, reason: str) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("POST", "/xml/echo", {"Content-Type": "application/xml"}, body)
    assert response.status == 400
    assert response.json()["reason"] == reason


def test_an_xml_answer_to_an_xml_client_is_xml_too(gateway) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange(
            "POST",
            "/xml/echo",
            {"Content-Type": "application/xml", "Accept": "application/xml"},
            b"<a x='1'/>",
        )
    assert response.status == 400
    assert response.header("content-type") == "application/xml; charset=utf-8"
    assert fromstring(response.body).findtext("reason") == "xml_attributes"


@pytest.mark.parametrize("chunked", [False, True])
def test_an_xml_body_over_the_limit_is_413(gateway, shared_upstream, chunked: bool) -> None:
    body = b"<order>" + b"<a>x</a>" * 200 + b"</order>"  # over xml.max_size (1 KB)
    headers = {"Content-Type": "application/xml"}
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:700], body[700:])) + b"0\r\n\r\n"
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("POST", "/xml/echo", headers, body)
    assert response.status == 413
    assert "1000 bytes" in response.json()["error"]
    with pytest.raises(AssertionError):
        find_request(shared_upstream, response.header("x-request-id"), timeout=0.2)


def test_a_cached_answer_is_mapped_and_negotiated_for_each_client(gateway) -> None:
    """The cache keeps the upstream's JSON; each hit is mapped, and written as XML or not, anew."""
    with RawConnection(gateway.port) as conn:
        first = conn.exchange("GET", "/cached/status/200", {"Accept": "application/xml"})
        as_json = conn.exchange("GET", "/cached/status/200")
        again = conn.exchange("GET", "/cached/status/200", {"Accept": "text/xml"})
    assert first.header("x-cache") == "MISS"
    assert first.body.endswith(b"<root><status>200</status><via>gw</via></root>")
    assert as_json.header("x-cache") == "HIT"
    assert as_json.header("content-type") == "application/json"
    assert _json(as_json.body) == {"status": 200, "via": "gw"}
    assert as_json.header("content-length") == str(len(as_json.body))
    assert again.header("x-cache") == "HIT" and again.header("content-type") == "text/xml; charset=utf-8"
    assert again.body == first.body


# -- counting --------------------------------------------------------------------------------------------


def test_every_outcome_is_counted_per_direction(upstream: UpstreamServer) -> None:
    config = f"""
routes:
  - name: counted-bodies
    path: /c/*
    target: {upstream.url}
    strip_prefix: true
    policies:
      transform:
        response: {{body: {{remove: [secret], max_size: 100}}}}
        xml: {{max_size: 200}}
"""
    sent = [
        (b'{"secret": 1, "a": 2}', "type=application/json", {}),  # mapped
        (b'{"a": 2}', "type=application/json", {}),  # unchanged
        (b'{"secret": ', "type=application/json&framing=chunked", {}),  # malformed
        (b"secret=1", "type=text/plain", {}),  # not_json
        (b'{"s": "' + b"s" * 200 + b'"}', "type=application/json", {}),  # too_large, by its length
        (b'{"s": "' + b"s" * 200 + b'"}', "type=application/json&framing=chunked", {}),  # found while held
        (gzip.compress(b'{"secret": 1}'), "type=application/json&h=content-encoding:gzip", {}),  # encoded
        (b'{"a": 1}', "type=application/json", {"Accept": "application/xml"}),  # xml
    ]
    with InProcessGateway(config) as gateway:
        policy = gateway.policy(0, "transform")
        for body, query, headers in sent:
            with RawConnection(gateway.port) as conn:
                response = conn.exchange("POST", f"/c/made?body=request&{query}", headers, body)
            assert response.status == 200
        assert policy.response_body_counts == {
            "mapped": 1,
            "unchanged": 1,
            "not_json": 1,
            "encoded": 1,
            "too_large": 2,
            "malformed": 1,
            "too_deep": 0,
            "xml": 1,
            "xml_refused": 0,
        }
        with RawConnection(gateway.port) as conn:
            xml = {"Content-Type": "application/xml"}
            assert conn.exchange("POST", "/c/echo", xml, b"<a><b>1</b></a>").status == 200
            assert conn.exchange("POST", "/c/echo", xml, b"<a>").status == 400
            assert conn.exchange("POST", "/c/echo", xml, b"<a>" + b"x" * 300 + b"</a>").status == 413
        assert policy.body_counts["xml"] == 1 and policy.body_counts["xml_refused"] == 2
        # The echoed JSON, the 400's and the 413's are responses over the 100-byte limit: not held.
        assert policy.response_body_counts["too_large"] == 5


def test_the_counts_are_a_prometheus_metric_merged_across_workers(
    shared_upstream: UpstreamServer, tmp_path: Path
) -> None:
    config = {
        "endpoints": {"metrics_prometheus": "/metrics/prometheus"},
        "routes": [route("metered", shared_upstream.url, {"response": {"body": {"remove": ["secret"]}}})],
    }
    with running_gateway(tmp_path, config, workers=2) as gw:
        for _ in range(6):  # each on its own connection: both workers take some
            answered(gw.port, "/metered", {"secret": 1})
        answered(gw.port, "/metered", raw=b"{")

        def counted() -> dict[str, float]:
            with RawConnection(gw.port) as conn:
                text = conn.exchange("GET", "/metrics/prometheus").body.decode()
            found: dict[str, float] = {}
            for family in text_string_to_metric_families(text):
                if family.name == "apigate_transform_bodies":
                    for sample in family.samples:
                        if sample.labels["route"] == "metered" and sample.labels["direction"] == "response":
                            found[sample.labels["outcome"]] = sample.value
            return found

        wait_until(lambda: counted() == {"mapped": 6.0, "malformed": 1.0}, timeout=15)


# -- config ----------------------------------------------------------------------------------------------


def test_apigate_check_names_each_bad_setting_with_its_line(tmp_path: Path) -> None:
    said = check_problems(
        tmp_path,
        """\
routes:
  - path: /a/*
    target: http://127.0.0.1:9
    policies:
      transform:
        response:
          body:
            remove: ["items[x]"]
            move: {"items[*].id": id}
            max_size: lots
        xml:
          root: "1order"
          respond_as_requested: maybe
          max_size: 0
          attributes: true
""",
    )
    where = "routes[0].policies.transform"
    for line, field, words in [
        (8, f"{where}.response.body.remove[0]", "an index is written"),
        (9, f"{where}.response.body.move.items[*].id", "not [*]"),
        (10, f"{where}.response.body.max_size", "expected a size"),
        (12, f"{where}.xml.root", "not an element name"),
        (13, f"{where}.xml.respond_as_requested", "valid boolean"),
        (14, f"{where}.xml.max_size", "greater than or equal to 1"),
        (15, f"{where}.xml.attributes", "Extra inputs are not permitted"),
    ]:
        assert any(
            f"line {line}: {field}:" in said_line and words in said_line for said_line in said.splitlines()
        ), (line, field, said)
