"""Hostile input at the front door: a table of raw-socket vectors against a real gateway process.

Each vector is bytes sent on a fresh client connection and what must come of them: the answers
in order, whether the gateway closes the connection, and which requests the recording upstream
may see. Whatever the vector, the upstream must only ever see requests the gateway framed
itself (they carry its ``Via``), never one for ``/smuggled``, and never one whose path, as a
backend would decode it, reaches the protected ``/jwt`` prefix without credentials. After each
vector a normal request on another connection must still be served.
"""

from __future__ import annotations

import posixpath
import select
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.gateway import GatewayProcess
from tests.support.hostile_upstream import HostileUpstream
from tests.support.proxy_http import RawConnection, RawResponse, RssSampler, WebSocketEcho, running_gateway
from tests.support.upstream import Seen, UpstreamServer

API_KEY = "hostile-suite-key-0123456789"
TIMEOUT = 5.0
RSS_LIMIT = 150 * 1024 * 1024
ANY_FINAL = frozenset(range(200, 600))
WS_KEY = "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


def suite_config(directory: Path, upstream: str, hostile: str, websocket: str) -> dict:
    return {
        "store": {"url": f"sqlite:///{directory / 'apigate.db'}"},
        "timeouts": {"header": "3s"},
        "consumers": [{"id": "hostile-tester", "keys": [{"key": API_KEY}]}],
        "routes": [
            {"path": "/jwt/*", "target": upstream, "preserve_host": True, "policies": {"key-auth": {}}},
            {"path": "/limited/*", "target": upstream, "max_body_size": "1KB"},
            {"path": "/evil/*", "target": hostile, "timeout": "5s"},
            {"path": "/ws/*", "target": websocket},
            {"path": "/*", "target": upstream, "preserve_host": True},
        ],
    }


class Servers:
    """The module's gateway and its upstreams (a plain class: Hypothesis prints its short repr)."""

    def __init__(self, gateway: GatewayProcess, upstream: UpstreamServer, hostile: HostileUpstream) -> None:
        self.gateway = gateway
        self.upstream = upstream
        self.hostile = hostile

    def __repr__(self) -> str:
        return f"Servers(gateway port {self.gateway.port})"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    directory = tmp_path_factory.mktemp("hostile")
    upstream = UpstreamServer(keeps_parsing_after_upgrade=True).start()
    try:
        with HostileUpstream() as hostile, WebSocketEcho() as echo:
            config = suite_config(directory, upstream.url, hostile.url, f"http://127.0.0.1:{echo.port}")
            with running_gateway(directory / "gw", config) as gateway:
                yield Servers(gateway, upstream, hostile)
    finally:
        upstream.stop()


# -- what the upstream may see ------------------------------------------------------------------------
def backend_path(path: str) -> str:
    """The path as a lenient backend would route it: percent-decoded (twice), `;params` dropped
    from each segment (as servlet containers do), dot segments resolved."""
    decoded = unquote(unquote(path))
    segments = [segment.split(";", 1)[0] for segment in decoded.split("/")]
    return posixpath.normpath("/" + "/".join(segments))


def framing_violations(seen: Seen) -> list[str]:
    problems = []
    if "apigate" not in (seen.header("via") or ""):
        problems.append(f"{seen.method} {seen.path}: bytes the gateway did not frame (no Via)")
    if seen.path.startswith("/smuggled"):
        problems.append(f"{seen.method} {seen.path}: a smuggled request")
    if (
        backend_path(seen.path).lower().startswith("/jwt")
        and seen.header("x-consumer-id") != "hostile-tester"
    ):
        problems.append(f"{seen.method} {seen.path}: the protected route without credentials")
    return problems


def assert_still_serving(servers: Servers, name: str) -> None:
    with RawConnection(servers.gateway.port, timeout=TIMEOUT) as conn:
        response = conn.exchange("GET", f"/after/{name}")
        assert response.status == 200, f"the gateway stopped serving after {name}"


# -- the table -------------------------------------------------------------------------------------------
Closing = Literal["closes", "stays open", "either"]


@dataclass(frozen=True)
class Vector:
    """``answers``: the statuses allowed for each answer, in order. ``may_stop_early``: the gateway
    may close after the first answer instead of giving the rest. ``forwarded``: the exact targets
    the upstream must see (None: not checked beyond the invariants)."""

    name: str
    raw: bytes
    answers: tuple[frozenset[int], ...]
    closing: Closing = "closes"
    forwarded: tuple[str, ...] | None = ()
    may_stop_early: bool = False
    forwarded_host: str | None = None
    header: str | None = None  # a header the first answer must carry


def describe(statuses: frozenset[int]) -> str:
    return "any final status" if statuses == ANY_FINAL else "/".join(map(str, sorted(statuses)))


def one(*statuses: int) -> tuple[frozenset[int], ...]:
    return (frozenset(statuses),)


def get(target: str, extra: str = "", version: str = "HTTP/1.1") -> bytes:
    return f"GET {target} {version}\r\nHost: t\r\n{extra}\r\n".encode("latin-1")


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"


def post(extra: str, body: bytes) -> bytes:
    return f"POST /v/framing HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode() + body + SMUGGLED


VECTORS = [
    # request lines (RFC 9112 §3)
    Vector("lowercase method", get("/v/lower").replace(b"GET", b"get"), one(400, 501)),
    Vector("method the gateway does not serve", get("/v/propfind").replace(b"GET", b"PROPFIND"), one(501)),
    Vector("method llhttp does not know", get("/v/brew").replace(b"GET", b"BREW"), one(400, 501)),
    Vector(
        "absolute-form target",
        b"GET http://absolute.test/v/absolute HTTP/1.1\r\nHost: other.test\r\n\r\n",
        one(200),
        "stays open",
        ("/v/absolute",),
        forwarded_host="absolute.test",
    ),
    Vector("authority-form for GET", get("absolute.test:80"), one(400)),
    Vector("asterisk-form for GET", get("*"), one(400)),
    Vector("HTTP/2.0 in a request line", get("/v/h2", version="HTTP/2.0"), one(505)),
    Vector("HTTP/1.2", get("/v/h12", version="HTTP/1.2"), one(200, 400, 505), "either", None),
    Vector("two spaces after the method", get(" /v/spaces"), one(400)),
    Vector("no version", b"GET /v/noversion\r\nHost: t\r\n\r\n", one(400)),
    Vector("NUL in the target", get("/v/nul\x00x"), one(400)),
    Vector("control byte in the target", get("/v/ctl\x01x"), one(400)),
    Vector("DEL in the target", get("/v/del\x7fx"), one(400)),
    Vector("URL over max_header_bytes", get("/v/" + "a" * 40_000), one(414, 431)),
    # header syntax (RFC 9112 §5)
    Vector("space before the colon", get("/v/space", "X-A : v\r\n"), one(400)),
    Vector("obs-fold", get("/v/fold", "X-A: v\r\n folded\r\n"), one(400)),
    Vector("bare LF", get("/v/lf", "X-A: a\nX-B: b\r\n"), one(400)),
    Vector("bare CR", get("/v/cr", "X-A: a\rX-B: b\r\n"), one(400)),
    Vector("NUL in a value", get("/v/nulvalue", "X-A: a\x00b\r\n"), one(400)),
    Vector("non-ASCII name", get("/v/name", "X-\xe9: a\r\n"), one(400)),
    Vector("HTTP/1.1 without Host", b"GET /v/nohost HTTP/1.1\r\n\r\n", one(400)),
    Vector("two Host headers", get("/v/twohosts", "Host: u\r\n"), one(400)),
    Vector("HTTP/1.0 without Host", b"GET /v/http10 HTTP/1.0\r\n\r\n", one(200), "closes", ("/v/http10",)),
    # framing and smuggling (RFC 9112 §6.1, §6.3, §7.1)
    Vector(
        "Content-Length then Transfer-Encoding",
        post("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        one(400),
    ),
    Vector(
        "Transfer-Encoding then Content-Length",
        post("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
        one(400),
    ),
    Vector("two Content-Lengths", post("Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), one(400)),
    Vector("Content-Length: +5", post("Content-Length: +5\r\n", b"hello"), one(400)),
    Vector(
        "Transfer-Encoding: chunked, identity",
        post("Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"),
        one(400),
    ),
    Vector("Transfer-Encoding: xchunked", post("Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"), one(400)),
    Vector(
        "chunk size overflow",
        post("Transfer-Encoding: chunked\r\n", b"fffffffffffffffffff1\r\nx\r\n0\r\n\r\n"),
        one(400),
    ),
    Vector("bad chunk size", post("Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n"), one(400)),
    Vector(
        "chunk extension that never ends",
        post("Transfer-Encoding: chunked\r\n", b"5;ext=" + b"a" * 70_000),
        one(400),
    ),
    # encodings in path and query: refused, or routed to the protected route
    Vector("encoded slash", get("/jwt%2fsecret"), one(400, 401), "either"),
    Vector("encoded letter", get("/%6Awt/secret"), one(400, 401), "either"),
    Vector("dot-dot with an encoded slash", get("/x/..%2fjwt/secret"), one(400, 401), "either"),
    Vector("dot-dot with a path parameter", get("/..;/jwt/secret"), one(400, 401), "either"),
    Vector("encoded NUL", get("/jwt%00/secret"), one(400, 401), "either"),
    Vector(
        "odd escapes in the query pass through",
        get("/v/query?a=%00&b=%zz"),
        one(200),
        "stays open",
        ("/v/query?a=%00&b=%zz",),
    ),
    # upgrades and CONNECT
    Vector(
        "upgrade head with a request behind it",
        get("/v/upgrade", "Connection: Upgrade\r\nUpgrade: websocket\r\n" + WS_KEY)
        + b"DELETE /jwt/admin/users/42 HTTP/1.1\r\nHost: t\r\nX-Consumer-ID: admin\r\n\r\n",
        (frozenset({200}), frozenset({401})),
        "either",
        ("/v/upgrade",),
        may_stop_early=True,
    ),
    Vector(
        "Upgrade: h2c is not tunneled",
        get(
            "/evil/switches-anyway",
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AA\r\n",
        ),
        (ANY_FINAL,),
        "either",
        None,
    ),
    Vector(
        "an unknown Upgrade token is not tunneled",
        get("/evil/switches-anyway", "Connection: Upgrade\r\nUpgrade: x-custom/1\r\n"),
        (ANY_FINAL,),
        "either",
        None,
    ),
    Vector(
        "CONNECT",
        b"CONNECT host.test:443 HTTP/1.1\r\nHost: host.test:443\r\n\r\n",
        one(405),
        "either",
        header="allow",
    ),
    # pipelining with a bad request in the middle: the first is answered, the third never runs
    Vector(
        "bad request inside a pipeline",
        get("/v/pipe1") + post("Content-Length: 1\r\nContent-Length: 2\r\n", b"ab") + get("/v/pipe3"),
        (frozenset({200}), frozenset({400})),
        "closes",
        ("/v/pipe1",),
    ),
    Vector(
        "body over max_body_size",
        b"POST /limited/x HTTP/1.1\r\nHost: t\r\nContent-Length: 2048\r\n\r\n" + b"b" * 2048,
        one(413),
        "either",
    ),
]


def read_answers(conn: RawConnection, count: int) -> list[RawResponse]:
    answers: list[RawResponse] = []
    for _ in range(count):
        try:
            answers.append(conn.read_response())
        except (EOFError, TimeoutError, ConnectionResetError):
            break
    return answers


@pytest.mark.parametrize("vector", VECTORS, ids=[vector.name for vector in VECTORS])
def test_hostile_request(servers: Servers, vector: Vector) -> None:
    upstream = servers.upstream
    before = len(upstream.requests)
    with RawConnection(servers.gateway.port, timeout=TIMEOUT) as conn:
        conn.send(vector.raw)
        answers = read_answers(conn, len(vector.answers))
        statuses = [answer.status for answer in answers]
        wanted = len(vector.answers) if not vector.may_stop_early else 1
        assert len(answers) >= wanted, f"{len(answers)} answers, wanted {len(vector.answers)}: {statuses}"
        wrong = [s for s, allowed in zip(statuses, vector.answers, strict=False) if s not in allowed]
        assert not wrong, f"answers {statuses}, allowed {[describe(a) for a in vector.answers]}"
        if vector.header:
            assert answers[0].header(vector.header), f"no {vector.header} in the answer"
        if vector.closing == "closes" or len(answers) < len(vector.answers):
            assert conn.closed_by_peer(), "the connection must be closed after this"
        elif vector.closing == "stays open":
            assert conn.is_open(), "the connection must stay usable"
    assert_still_serving(servers, vector.name.replace(" ", "-"))
    seen = [s for s in upstream.requests[before:] if not s.path.startswith("/after/")]
    problems = [problem for s in seen for problem in framing_violations(s)]
    assert not problems, problems
    if vector.forwarded is not None:
        assert [s.path + (f"?{s.query}" if s.query else "") for s in seen] == list(vector.forwarded)
    if vector.forwarded_host is not None:
        assert seen[0].header("host") == vector.forwarded_host


# -- beyond the table -------------------------------------------------------------------------------
def test_websocket_to_an_upstream_that_upgrades_still_works(servers: Servers) -> None:
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{servers.gateway.port}/ws/chat", open_timeout=TIMEOUT) as ws:
        assert ws.recv(timeout=TIMEOUT) == "hello"
        ws.send("ping")
        assert ws.recv(timeout=TIMEOUT) == "ping"


EARLY_CLOSES = {
    "mid-head": b"GET /v/early HTTP/1.1\r\nHost: t\r\nX-Half: ",
    "mid-body": b"POST /v/early HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly part",
    "right after the head": b"POST /v/early HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n",
}


@pytest.mark.parametrize("raw", EARLY_CLOSES.values(), ids=EARLY_CLOSES.keys())
def test_client_closing_early(servers: Servers, raw: bytes) -> None:
    before = len(servers.upstream.requests)
    with RawConnection(servers.gateway.port, timeout=TIMEOUT) as conn:
        conn.send(raw)
    assert_still_serving(servers, "early-close")
    assert [s.path for s in servers.upstream.requests[before:]] == ["/after/early-close"]


def send_until_answered(conn: RawConnection, start: bytes, filler: bytes, limit: int) -> int:
    """Send ``start`` then ``filler`` repeatedly until the gateway answers or stops reading, or
    ``limit`` bytes went out; how many bytes were sent."""
    conn.sock.sendall(start)
    sent = len(start)
    while sent < limit:
        if select.select([conn.sock], [], [], 0)[0]:
            break
        try:
            conn.sock.sendall(filler)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(filler)
    return sent


def test_header_line_that_never_ends_is_431_quickly_and_memory_stays_bounded(servers: Servers) -> None:
    started = time.monotonic()
    with (
        RssSampler(servers.gateway.proc.pid) as rss,
        RawConnection(servers.gateway.port, timeout=TIMEOUT) as conn,
    ):
        send_until_answered(conn, b"GET /v/endless HTTP/1.1\r\nHost: t\r\nX-Endless: ", b"v" * 16384, 4 << 20)
        response = conn.read_response()
        assert response.status == 431
        assert conn.closed_by_peer()
    assert time.monotonic() - started < TIMEOUT
    assert rss.peak < RSS_LIMIT, f"gateway RSS peaked at {rss.peak >> 20} MB"
    assert_still_serving(servers, "endless-header")


# -- what a hostile upstream sends ---------------------------------------------------------------------
BAD_UPSTREAM_ANSWERS = [
    "/evil/content-length-and-chunked",
    "/evil/bad-chunk",
    "/evil/endless-head",
    "/evil/endless-chunk-extension",
    "/evil/unasked-switch",
]


@pytest.mark.parametrize("path", BAD_UPSTREAM_ANSWERS)
def test_broken_upstream_answer_is_502_never_passed_on(servers: Servers, path: str) -> None:
    """A broken answer becomes 502 (RFC 9112 §6.3: a proxy must not forward a response it cannot
    frame); one whose head was already passed on can only be cut off, never completed or tunneled."""
    with (
        RssSampler(servers.gateway.proc.pid) as rss,
        RawConnection(servers.gateway.port, timeout=TIMEOUT) as conn,
    ):
        conn.send(conn.request("GET", path))
        try:
            response = conn.read_response()
        except EOFError:
            response = None  # cut off after the head: the client cannot mistake it for a whole answer
        if response is not None:
            assert response.status == 502, f"{response.status} {response.body[:100]!r}"
    assert rss.peak < RSS_LIMIT, f"gateway RSS peaked at {rss.peak >> 20} MB"
    assert_still_serving(servers, path.rsplit("/", 1)[1])


@pytest.mark.parametrize("first_path", ["/evil/longer-than-length", "/evil/longer-than-length-partial"])
def test_bytes_beyond_content_length_never_reach_the_next_request(servers: Servers, first_path: str) -> None:
    with RawConnection(servers.gateway.port, timeout=TIMEOUT) as conn:
        first = conn.exchange("GET", first_path)
        assert first.status == 200 and first.body == b"hello"
        for _ in range(3):  # on whichever pooled upstream connection the gateway picks
            second = conn.exchange("GET", "/evil/second")
            assert (second.status, second.body) == (200, b"second")


def test_interim_flood_ends_in_one_final_answer(servers: Servers) -> None:
    started = time.monotonic()
    with (
        RssSampler(servers.gateway.proc.pid) as rss,
        RawConnection(servers.gateway.port, timeout=TIMEOUT) as conn,
    ):
        conn.send(conn.request("GET", "/evil/interim-flood"))
        response = conn.read_response()
        while 100 <= response.status < 200:
            assert response.status != 101
            response = conn.read_response()
        assert response.status in (200, 502)
    assert time.monotonic() - started < TIMEOUT
    assert rss.peak < RSS_LIMIT
    assert_still_serving(servers, "interim-flood")


# -- a body that trickles in, on a route that buffers bodies ---------------------------------------------
def test_slow_body_on_a_buffering_route_is_408(tmp_path: Path, start_gateway) -> None:
    """One byte every half second never counts as idle, so only the route's whole-exchange
    ``timeout`` can end it; a gateway that resets its clock on every byte never answers."""
    gateway = start_gateway(
        {
            "store": {"url": f"sqlite:///{tmp_path / 'apigate.db'}"},
            "timeouts": {"body_idle": "1s", "drain": "1s"},
            "routes": [
                {
                    "path": "/oauth/token",
                    "timeout": "2s",
                    "policies": {"oauth2-token": {"secret": "a-token-signing-secret-of-32-bytes!"}},
                }
            ],
        }
    )
    with RawConnection(gateway.port, timeout=TIMEOUT) as conn:
        conn.send(
            b"POST /oauth/token HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        )
        conn.send(b"Content-Length: 100\r\n\r\n")
        started = time.monotonic()
        answered = False
        while time.monotonic() - started < 6 and not answered:
            try:
                conn.send(b"a")
            except (BrokenPipeError, ConnectionResetError):
                break
            answered = bool(select.select([conn.sock], [], [], 0.5)[0])  # time is the subject here
        response = conn.read_response()
        assert response.status == 408
        assert time.monotonic() - started < 4, "the route's 2 s timeout must bound the body"
        assert conn.closed_by_peer()


# -- one connection, many requests: the upstream only sees what the gateway admitted ---------------------
FRAGMENTS = ("public", "protected", "content-length with chunked", "upgrade", "stray bytes", "bad chunk")


def fragment(kind: str, marker: str) -> bytes:
    """A request (or a hostile piece of one) to send on a shared connection; public requests
    carry ``marker`` in their path and in X-Marker, so that each can be admitted only once."""
    if kind == "public":
        return get(f"/p/{marker}", f"X-Marker: {marker}\r\n")
    if kind == "protected":
        return get(f"/jwt/{marker}", f"X-Marker: {marker}\r\nX-Consumer-ID: admin\r\n")
    if kind == "content-length with chunked":
        return post("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n")
    if kind == "upgrade":
        return get(
            f"/p/{marker}", f"X-Marker: {marker}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{WS_KEY}"
        )
    if kind == "stray bytes":
        return b"\r\n\x00\x01garbage " + SMUGGLED
    return post("Transfer-Encoding: chunked\r\n", b"4\r\nabc\r\nzz\r\n")


def read_all_answers(conn: RawConnection) -> list[int]:
    statuses = []
    while True:
        try:
            statuses.append(conn.read_response().status)
        except (EOFError, TimeoutError, ConnectionResetError, ValueError):
            return statuses


@settings(max_examples=25, derandomize=True, deadline=None)
@given(kinds=st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=6))
def test_upstream_sees_only_admitted_requests(servers: Servers, kinds: list[str]) -> None:
    upstream = servers.upstream
    before = len(upstream.requests)
    markers = [f"m{before}-{index}" for index in range(len(kinds))]
    last = f"m{before}-last"
    raw = b"".join(fragment(kind, marker) for kind, marker in zip(kinds, markers, strict=True))
    raw += get(f"/p/{last}", f"X-Marker: {last}\r\nConnection: close\r\n")
    with RawConnection(servers.gateway.port, timeout=2) as conn:
        conn.send(raw)
        statuses = read_all_answers(conn)
    assert_still_serving(servers, "property")
    seen = [s for s in upstream.requests[before:] if not s.path.startswith("/after/")]
    admitted = {m for kind, m in zip(kinds, markers, strict=True) if kind in ("public", "upgrade")} | {last}
    problems = [problem for s in seen for problem in framing_violations(s)]
    problems += [
        f"{s.path}: not a public request of this connection" for s in seen if s.path[3:] not in admitted
    ]
    problems += [
        f"{s.path}: X-Marker {s.header('x-marker')}" for s in seen if s.header("x-marker") != s.path[3:]
    ]
    markers_seen = [s.path for s in seen]
    assert not problems, (kinds, problems)
    assert len(markers_seen) == len(set(markers_seen)), (
        f"a request reached the upstream twice: {markers_seen}"
    )
    assert len(seen) <= sum(200 <= status < 300 for status in statuses), (kinds, statuses, markers_seen)
