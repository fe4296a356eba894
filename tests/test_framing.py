"""The heads the proxy writes and the framing it chooses (engine/framing.py), as tables of plain
values in and exact bytes out: no connection, no gateway."""

from __future__ import annotations

from typing import Any

import pytest

from apigate.engine import framing

# -- the request head sent upstream ------------------------------------------------------------

TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
REQUEST: dict[str, Any] = {
    "method": "GET",
    "raw_path": b"/a",
    "rewritten_path": None,
    "query": b"",
    "client_host": None,
    "target_host": b"backend:8080",
    "headers": [(b"host", b"gw.example"), (b"accept", b"*/*")],
    "body": None,
    "xff": None,
    "peer": b"192.0.2.7",
    "forwarded_proto": b"http",
    "forwarded_host": b"gw.example",
    "rid": b"rid-1",
    "traceparent": TRACEPARENT,
    "upgrade_to": None,
    "chunked": False,
}
# What the gateway adds after the client's fields, for REQUEST as it is.
GATEWAY_FIELDS = (
    b"x-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\nvia: 1.1 apigate\r\n"
    b"x-request-id: rid-1\r\ntraceparent: " + TRACEPARENT + b"\r\nx-forwarded-host: gw.example\r\n"
)


@pytest.mark.parametrize(
    ("changes", "head"),
    [
        pytest.param(
            {},
            b"GET /a HTTP/1.1\r\nhost: backend:8080\r\naccept: */*\r\n" + GATEWAY_FIELDS + b"\r\n",
            id="plain",
        ),
        pytest.param(
            {"query": b"x=1&y=%20"},
            b"GET /a?x=1&y=%20 HTTP/1.1\r\nhost: backend:8080\r\naccept: */*\r\n" + GATEWAY_FIELDS + b"\r\n",
            id="query",
        ),
        pytest.param(
            {"raw_path": b"/a%2Fb", "method": "DELETE"},
            b"DELETE /a%2Fb HTTP/1.1\r\nhost: backend:8080\r\naccept: */*\r\n" + GATEWAY_FIELDS + b"\r\n",
            id="raw-path-as-sent",
        ),
        pytest.param(
            {"raw_path": b"/users/42", "rewritten_path": "/echo/42", "query": b"q=1"},
            b"GET /echo/42?q=1 HTTP/1.1\r\nhost: backend:8080\r\naccept: */*\r\n" + GATEWAY_FIELDS + b"\r\n",
            id="rewritten-path",
        ),
        pytest.param(
            {"rewritten_path": "/caf\xe9"},
            b"GET /caf\xe9 HTTP/1.1\r\nhost: backend:8080\r\naccept: */*\r\n" + GATEWAY_FIELDS + b"\r\n",
            id="rewritten-path-latin-1",
        ),
        pytest.param(
            {"client_host": "gw.example"},
            b"GET /a HTTP/1.1\r\nhost: gw.example\r\naccept: */*\r\n" + GATEWAY_FIELDS + b"\r\n",
            id="preserve-host",
        ),
        pytest.param(
            {"client_host": "", "forwarded_host": None},
            b"GET /a HTTP/1.1\r\nhost: backend:8080\r\naccept: */*\r\n"
            b"x-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\nvia: 1.1 apigate\r\n"
            b"x-request-id: rid-1\r\ntraceparent: " + TRACEPARENT + b"\r\n\r\n",
            id="preserve-host-without-one",
        ),
        pytest.param(
            {
                "headers": [
                    (b"host", b"gw.example"),
                    (b"x-forwarded-for", b"198.51.100.1"),
                    (b"x-forwarded-proto", b"https"),
                    (b"x-forwarded-host", b"evil.example"),
                    (b"x-request-id", b"client-id"),
                    (b"traceparent", b"00-11111111111111111111111111111111-2222222222222222-01"),
                    (b"expect", b"100-continue"),
                    (b"connection", b"keep-alive"),
                    (b"keep-alive", b"timeout=5"),
                    (b"proxy-connection", b"keep-alive"),
                    (b"proxy-authorization", b"Basic eA=="),
                    (b"te", b"trailers"),
                    (b"trailer", b"x-checksum"),
                    (b"transfer-encoding", b"chunked"),
                    (b"upgrade", b"websocket"),
                    (b"content-type", b"text/plain"),
                    (b"content-length", b"5"),
                ]
            },
            b"GET /a HTTP/1.1\r\nhost: backend:8080\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n"
            + GATEWAY_FIELDS
            + b"\r\n",
            id="owned-fields-dropped",
        ),
        pytest.param(
            {
                "method": "POST",
                "body": b"hello",
                "headers": [(b"content-length", b"999"), (b"content-type", b"text/plain")],
            },
            b"POST /a HTTP/1.1\r\nhost: backend:8080\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n"
            + GATEWAY_FIELDS
            + b"\r\n",
            id="buffered-body-own-length",
        ),
        pytest.param(
            {"method": "POST", "body": b"", "headers": []},
            b"POST /a HTTP/1.1\r\nhost: backend:8080\r\ncontent-length: 0\r\n" + GATEWAY_FIELDS + b"\r\n",
            id="buffered-empty-body",
        ),
        pytest.param(
            {"xff": b"203.0.113.9, 198.51.100.2", "forwarded_proto": b"https", "forwarded_host": None},
            b"GET /a HTTP/1.1\r\nhost: backend:8080\r\naccept: */*\r\n"
            b"x-forwarded-for: 203.0.113.9, 198.51.100.2, 192.0.2.7\r\nx-forwarded-proto: https\r\n"
            b"via: 1.1 apigate\r\nx-request-id: rid-1\r\ntraceparent: " + TRACEPARENT + b"\r\n\r\n",
            id="trusted-chain-appended",
        ),
        pytest.param(
            {"method": "POST", "chunked": True},
            b"POST /a HTTP/1.1\r\nhost: backend:8080\r\naccept: */*\r\n"
            + GATEWAY_FIELDS
            + b"transfer-encoding: chunked\r\n\r\n",
            id="chunked-body",
        ),
        pytest.param(
            {"upgrade_to": b"websocket", "chunked": True},
            b"GET /a HTTP/1.1\r\nhost: backend:8080\r\naccept: */*\r\n"
            + GATEWAY_FIELDS
            + b"connection: upgrade\r\nupgrade: websocket\r\n\r\n",
            id="upgrade-not-chunked",
        ),
    ],
)
def test_upstream_head(changes: dict[str, Any], head: bytes) -> None:
    assert framing.upstream_head(**{**REQUEST, **changes}) == head


# -- the upstream's response fields --------------------------------------------------------------

RID_FIELD = (b"x-request-id", b"rid-1")


@pytest.mark.parametrize(
    "owned",
    [b"connection", b"keep-alive", b"proxy-authenticate", b"te", b"trailer", b"upgrade", b"x-request-id"],
)
def test_response_fields_drop_what_the_gateway_owns(owned: bytes) -> None:
    upstream = [(b"server", b"nginx"), (owned, b"keep-alive"), (b"content-length", b"2")]
    kept = [(b"server", b"nginx"), (b"content-length", b"2"), RID_FIELD]
    assert framing.response_fields(upstream, b"rid-1") == (kept, True, False)


@pytest.mark.parametrize(
    ("upstream", "kept", "length_known", "chunked"),
    [
        pytest.param([(b"content-length", b"2")], [(b"content-length", b"2")], True, False, id="length"),
        pytest.param([(b"transfer-encoding", b"chunked"), (b"trailer", b"x")], [], False, True, id="chunked"),
        pytest.param([(b"date", b"today")], [(b"date", b"today")], False, False, id="no-length"),
    ],
)
def test_response_fields_tell_how_the_body_is_framed(
    upstream: list[tuple[bytes, bytes]], kept: list[tuple[bytes, bytes]], length_known: bool, chunked: bool
) -> None:
    assert framing.response_fields(upstream, b"rid-1") == ([*kept, RID_FIELD], length_known, chunked)


@pytest.mark.parametrize(
    ("connection", "kept"),
    [
        (b"close, X-Internal", [(b"date", b"today")]),
        (b"x-internal,,keep-alive", [(b"date", b"today")]),
        (b"Keep-Alive", [(b"x-internal", b"secret"), (b"date", b"today")]),
        (b"close", [(b"x-internal", b"secret"), (b"date", b"today")]),
    ],
)
def test_response_fields_drop_what_connection_names(
    connection: bytes, kept: list[tuple[bytes, bytes]]
) -> None:
    upstream = [(b"connection", connection), (b"x-internal", b"secret"), (b"date", b"today")]
    assert framing.response_fields(upstream, b"rid-1") == ([*kept, RID_FIELD], False, False)


# -- the response head sent to the client --------------------------------------------------------

RESPONSE: dict[str, Any] = {
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"x-request-id", b"rid-1")],
    "length_known": True,
    "chunked": False,
    "method": "GET",
    "version": "1.1",
    "keep_alive": True,
    "upgrade": False,
    "closing": False,
}
STATUS_LINES = {
    200: b"HTTP/1.1 200 OK\r\n",
    204: b"HTTP/1.1 204 No Content\r\n",
    304: b"HTTP/1.1 304 Not Modified\r\n",
    599: b"HTTP/1.1 599 Unknown\r\n",
}
CHUNKED = b"transfer-encoding: chunked\r\n"
CLOSE = b"connection: close\r\n"
KEEP_ALIVE = b"connection: keep-alive\r\n"


@pytest.mark.parametrize(
    ("changes", "added", "rechunk", "until_eof", "close"),
    [
        pytest.param({}, b"", False, False, False, id="1.1-keep-alive-with-length"),
        pytest.param({"length_known": False}, CHUNKED, True, True, False, id="1.1-no-length-chunked"),
        pytest.param({"length_known": False, "chunked": True}, CHUNKED, True, False, False, id="1.1-chunked"),
        pytest.param({"length_known": False, "version": "1.0"}, CLOSE, False, True, True, id="1.0-no-length"),
        pytest.param(
            {"chunked": True, "length_known": False, "version": "1.0"},
            CLOSE,
            False,
            False,
            True,
            id="1.0-chunked",
        ),
        pytest.param({"version": "1.0"}, KEEP_ALIVE, False, False, False, id="1.0-keep-alive"),
        pytest.param(
            {"version": "1.0", "keep_alive": False}, CLOSE, False, False, True, id="1.0-no-keep-alive"
        ),
        pytest.param({"keep_alive": False}, CLOSE, False, False, True, id="1.1-client-closes"),
        pytest.param({"length_known": False, "method": "HEAD"}, b"", False, False, False, id="head"),
        pytest.param(
            {"status": 204, "length_known": False, "chunked": True}, b"", False, False, False, id="204"
        ),
        pytest.param(
            {"status": 304, "length_known": False, "version": "1.0"},
            KEEP_ALIVE,
            False,
            False,
            False,
            id="304",
        ),
        pytest.param({"closing": True}, CLOSE, False, False, True, id="closing"),
        pytest.param(
            {"closing": True, "length_known": False},
            CHUNKED + CLOSE,
            True,
            True,
            True,
            id="closing-no-length",
        ),
        pytest.param({"upgrade": True, "closing": True}, CLOSE, False, False, True, id="upgrade-declined"),
        pytest.param({"status": 599}, b"", False, False, False, id="unregistered-status"),
    ],
)
def test_response_head(
    changes: dict[str, Any], added: bytes, rechunk: bool, until_eof: bool, close: bool
) -> None:
    """``added``: what the gateway writes after the fields it forwards."""
    given = {**RESPONSE, **changes}
    head = (
        STATUS_LINES[given["status"]]
        + b"content-type: text/plain\r\nx-request-id: rid-1\r\n"
        + added
        + b"\r\n"
    )
    assert framing.response_head(**given) == (head, rechunk, until_eof, close)


def test_switch_head() -> None:
    fields = [(b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), (b"x-request-id", b"rid-1")]
    assert framing.switch_head(fields, b"websocket") == (
        b"HTTP/1.1 101 Switching Protocols\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"x-request-id: rid-1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    )


# -- answers the gateway makes itself ------------------------------------------------------------

ERROR_BODY = b'{"error":"no route matches this request","request_id":"rid-1"}'


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param(
            {},
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 62\r\n"
            b"x-request-id: rid-1\r\n\r\n" + ERROR_BODY,
            id="json-error",
        ),
        pytest.param(
            {"method": "HEAD"},
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 62\r\n"
            b"x-request-id: rid-1\r\n\r\n",
            id="head-gets-the-head-alone",
        ),
        pytest.param(
            {"closing": True},
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 62\r\n"
            b"x-request-id: rid-1\r\nconnection: close\r\n\r\n" + ERROR_BODY,
            id="closing",
        ),
        pytest.param(
            {
                "status": 200,
                "content_type": b"text/plain; charset=utf-8",
                "body": b"ok\n",
                "headers": [(b"cache-control", b"no-store"), (b"x-request-id", b"rid-1")],
            },
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 3\r\n"
            b"cache-control: no-store\r\nx-request-id: rid-1\r\n\r\nok\n",
            id="content-type-and-fields",
        ),
        pytest.param(
            {"status": 204, "body": b"", "headers": [(b"vary", b"Origin"), (b"x-request-id", b"rid-1")]},
            b"HTTP/1.1 204 No Content\r\nvary: Origin\r\nx-request-id: rid-1\r\n\r\n",
            id="no-content-has-no-type-nor-length",
        ),
        pytest.param(
            {"status": 304, "headers": [(b"etag", b'"v1"')]},
            b'HTTP/1.1 304 Not Modified\r\netag: "v1"\r\n\r\n',
            id="not-modified-has-no-body-nor-length",
        ),
        pytest.param(
            {"status": 200, "content_type": b"", "body": b"ok", "headers": []},
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            id="no-content-type",
        ),
    ],
)
def test_reply_message(changes: dict[str, Any], message: bytes) -> None:
    reply: dict[str, Any] = {
        "status": 404,
        "content_type": b"application/json",
        "body": ERROR_BODY,
        "headers": [(b"x-request-id", b"rid-1")],
        "method": "GET",
        "closing": False,
    }
    assert framing.reply_message(**{**reply, **changes}) == message


# -- header lines a request-phase policy adds (Exchange.response_lines) -----------------------------

LINES = b'ratelimit: "burst";r=4;t=1\r\n'


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "framed"])
def test_response_head_adds_the_lines_after_the_forwarded_fields(fast: bool) -> None:
    given = {**RESPONSE, "lines": LINES} if fast else {**RESPONSE, "lines": LINES, "closing": True}
    head, *_ = framing.response_head(**given)
    assert head == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-request-id: rid-1\r\n"
        b'ratelimit: "burst";r=4;t=1\r\n' + (b"" if fast else b"connection: close\r\n") + b"\r\n"
    )


def test_reply_message_adds_the_lines_after_its_fields() -> None:
    message = framing.reply_message(
        status=429,
        content_type=b"application/json",
        body=b"{}",
        headers=[(b"retry-after", b"1"), (b"x-request-id", b"rid-1")],
        method="GET",
        closing=False,
        lines=LINES,
    )
    assert message == (
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
        b'retry-after: 1\r\nx-request-id: rid-1\r\nratelimit: "burst";r=4;t=1\r\n\r\n{}'
    )
