"""The `compression` policy: gzip, brotli and zstd round trips through a real gateway, the rules
that decide when a body is compressed (Accept-Encoding and its weights, content types, sizes,
no-transform, partial and already-encoded responses, HEAD), the headers that go with it, a large
body in flat memory, a slow client, and bad settings."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import sys
import zlib
from collections.abc import Callable
from urllib.parse import urlencode

import brotli
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apigate.config.compile import compile_plan
from apigate.config.loader import ConfigError, load_config
from apigate.engine.upstream import PoolManager
from apigate.policies.compression import installed_codings
from apigate.policies.compression.hotpath import Compression, MediaTypes, choose_coding, parse_qvalue
from tests.support.proxy_http import (
    RawConnection,
    RawResponse,
    RssSampler,
    bytes_read,
    rss_bytes,
    running_gateway,
    wait_until_steady,
)
from tests.support.upstream import made_body, made_pieces

MiB = 1 << 20
CODINGS = ("zstd", "br", "gzip")
GZIP_JSON = {"compression": {"encodings": ["gzip"], "content_types": ["application/json"]}}


def decode(coding: str | None, data: bytes) -> bytes:
    if coding is None:
        return data
    if coding == "gzip":
        return gzip.decompress(data)
    if coding == "br":
        return brotli.decompress(data)
    assert coding == "zstd"
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def streaming_decoder(coding: str) -> Callable[[bytes], bytes]:
    if coding == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress
    if coding == "br":
        return brotli.Decompressor().process
    return zstandard.ZstdDecompressor().decompressobj().decompress


@pytest.fixture(scope="module")
def gateway(shared_upstream, tmp_path_factory):
    def route(path: str, policies: dict) -> dict:
        return {"path": f"/{path}/*", "target": shared_upstream.url, "rewrite": "/made", "policies": policies}

    config = {
        "routes": [
            route("c", {"compression": None}),
            route("gzip-json", GZIP_JSON),
            route("small", {"compression": {"min_size": 10}}),
            route("fast", {"compression": {"encodings": ["gzip"], "gzip_level": 1}}),
            route("plain", {}),
            {
                "path": "/answered",
                "policies": {
                    "request-termination": {"status": 503, "message": "maintenance " * 80},
                    "compression": {"min_size": 100},
                },
            },
        ],
    }
    with running_gateway(tmp_path_factory.mktemp("gw"), config) as gw:
        yield gw


def made(route: str = "c", **args: object) -> str:
    """The path of a /made body through ``route`` (``h`` may be a list of name:value headers)."""
    return f"/{route}/x?" + urlencode(args, doseq=True)


def get(gateway, path: str, accept: str | None = None, method: str = "GET") -> RawResponse:
    headers = {} if accept is None else {"Accept-Encoding": accept}
    with RawConnection(gateway.port) as conn:
        return conn.exchange(method, path, headers)


def assert_compressed(response: RawResponse, coding: str, body: bytes) -> None:
    assert response.status == 200
    assert response.header("content-encoding") == coding
    assert response.header("content-length") is None and response.chunked
    assert "Accept-Encoding" in response.header("vary")
    assert decode(coding, response.body) == body


def assert_identity(response: RawResponse, body: bytes) -> None:
    assert response.header("content-encoding") is None
    assert response.body == body


# -- round trips -----------------------------------------------------------------------------------


def test_every_coding_is_installed_here() -> None:
    assert installed_codings() == CODINGS


@pytest.mark.parametrize("coding", CODINGS)
def test_each_coding_round_trips(gateway, coding: str) -> None:
    body = made_body(200_000)
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", made(size=200_000), {"Accept-Encoding": coding})
        assert_compressed(response, coding, body)
        assert len(response.body) < len(body) / 5
        # The connection goes on: the compressed body was framed and ended properly.
        again = conn.exchange("GET", made(size=5000), {"Accept-Encoding": coding})
        assert_compressed(again, coding, made_body(5000))


@pytest.mark.parametrize("coding", CODINGS)
def test_a_chunked_upstream_body_is_compressed(gateway, coding: str) -> None:
    response = get(gateway, made(size=50_000, framing="chunked"), coding)
    assert_compressed(response, coding, made_body(50_000))


def test_a_close_delimited_upstream_body_is_compressed(gateway) -> None:
    assert_compressed(get(gateway, made(size=30_000, framing="eof"), "gzip"), "gzip", made_body(30_000))


def test_an_http10_client_gets_the_compressed_body_until_the_close(gateway) -> None:
    with RawConnection(gateway.port) as conn:
        conn.send(f"GET {made(size=20_000)} HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n".encode())
        head = conn.read_head()
        assert head.header("content-encoding") == "gzip" and head.header("connection") == "close"
        assert head.header("transfer-encoding") is None and head.header("content-length") is None
        assert gzip.decompress(conn.read_to_eof()) == made_body(20_000)


def test_the_plain_route_is_untouched(gateway) -> None:
    response = get(gateway, made("plain", size=20_000), "gzip")
    assert response.header("content-length") == "20000" and not response.chunked
    assert response.header("vary") is None
    assert_identity(response, made_body(20_000))


def test_a_gateway_answer_is_compressed_with_its_own_length(gateway) -> None:
    response = get(gateway, "/answered", "gzip")
    assert response.status == 503 and response.header("content-encoding") == "gzip"
    assert int(response.header("content-length")) == len(response.body)
    assert response.header("content-type") == "application/json"
    assert b"maintenance maintenance" in gzip.decompress(response.body)


# -- Accept-Encoding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("gzip, deflate, br, zstd", "zstd"),  # equal weights: the gateway's preference
        ("gzip;q=1.0, br;q=0.5", "gzip"),
        ("br;q=0.9, gzip;q=0.8, zstd;q=0.1", "br"),
        ("*", "zstd"),
        ("*;q=0.5, gzip", "gzip"),
        ("identity;q=0, gzip", "gzip"),
        ("x-gzip", "gzip"),
        ("GZIP", "gzip"),
        ("gzip;q=0", None),
        ("*;q=0", None),
        ("identity", None),
        ("identity;q=1, gzip;q=0.5", None),  # the client prefers it as it is
        ("", None),
        ("deflate, compress", None),
        ("gzip;q=2", None),  # a malformed weight: the coding counts as not named
        ("gzip;q=0.5x, br", "br"),
    ],
)
def test_the_coding_follows_accept_encoding(gateway, accept: str, chosen: str | None) -> None:
    response = get(gateway, made(size=3000), accept)
    if chosen is None:
        assert_identity(response, made_body(3000))
        assert response.header("vary") == "Accept-Encoding"  # it would have been compressed for another
    else:
        assert_compressed(response, chosen, made_body(3000))


def test_without_accept_encoding_nothing_is_compressed_but_vary_says_it_could_be(gateway) -> None:
    response = get(gateway, made(size=3000))
    assert_identity(response, made_body(3000))
    assert response.header("content-length") == "3000"
    assert response.header("vary") == "Accept-Encoding"


@pytest.mark.parametrize(
    ("params", "weight"),
    [
        (";q=1", 1000),
        (";q=0", 0),
        (";q=0.5", 500),
        (";Q=0.125", 125),
        (";q=1.000", 1000),
        (";q=0.", 0),
        (";q=1.5", -1),
        (";q=0.1234", -1),
        (";q=abc", -1),
        (";q=", -1),
        (";level=1", 1000),
        (";a=b;q=0.25", 250),
    ],
)
def test_qvalues(params: str, weight: int) -> None:
    assert parse_qvalue(params.encode()) == weight


@given(st.binary(max_size=200))
def test_any_accept_encoding_gives_a_coding_or_none(value: bytes) -> None:
    assert choose_coding(value, (b"zstd", b"br", b"gzip")) in (b"zstd", b"br", b"gzip", None)


# Field values a client can send: visible ASCII, spaces and tabs (RFC 9110 §5.5), no CR or LF;
# and values made of Accept-Encoding's own pieces, which reach deeper into the parsing.
_FIELD_VALUE = st.text(st.characters(min_codepoint=32, max_codepoint=126) | st.just("\t"), max_size=120)
_PIECES = ["gzip", "br", "zstd", "*", "identity", "x-gzip", ";q=0", ";q=0.5", ";q=1", ",", " ", ";", "q="]
_ACCEPT = st.one_of(_FIELD_VALUE, st.lists(st.sampled_from(_PIECES), max_size=12).map("".join))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(accept=_ACCEPT)
def test_any_accept_encoding_never_breaks_the_exchange(gateway, accept: str) -> None:
    response = get(gateway, made(size=2000), accept.strip(" \t"))
    assert response.status == 200
    assert decode(response.header("content-encoding"), response.body) == made_body(2000)


# -- what is compressed ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "compressed"),
    [
        ("text/html; charset=utf-8", True),
        ("text/css", True),
        ("application/json", True),
        ("Application/JSON", True),
        ("application/problem+json", True),
        ("application/atom+xml", True),
        ("application/javascript", True),
        ("image/svg+xml", True),
        ("image/png", False),
        ("application/octet-stream", False),
        ("application/jsonx", False),
        ("text/event-stream", False),
    ],
)
def test_content_types(gateway, content_type: str, compressed: bool) -> None:
    response = get(gateway, made(size=3000, type=content_type), "gzip")
    if compressed:
        assert_compressed(response, "gzip", made_body(3000))
    else:
        assert_identity(response, made_body(3000))
        assert response.header("vary") is None  # the client's Accept-Encoding changed nothing


def test_a_configured_content_type_list_replaces_the_default(gateway) -> None:
    assert_identity(get(gateway, made("gzip-json", size=3000), "gzip, br"), made_body(3000))
    json_body = get(gateway, made("gzip-json", size=3000, type="application/json"), "gzip, br")
    assert_compressed(json_body, "gzip", made_body(3000))  # br is not among its encodings


def test_no_content_type_is_not_compressed(gateway) -> None:
    response = get(gateway, made(size=3000, type="-"), "gzip")
    assert_identity(response, made_body(3000))


@pytest.mark.parametrize(("size", "compressed"), [(1023, False), (1024, True), (0, False)])
def test_min_size_by_content_length(gateway, size: int, compressed: bool) -> None:
    response = get(gateway, made(size=size), "gzip")
    if compressed:
        assert_compressed(response, "gzip", made_body(size))
    else:
        assert_identity(response, made_body(size))
        assert response.header("content-length") == str(size)


def test_a_body_of_unknown_length_is_compressed_however_small(gateway) -> None:
    assert_compressed(get(gateway, made(size=20, framing="chunked"), "gzip"), "gzip", made_body(20))
    assert_compressed(get(gateway, made("small", size=20), "gzip"), "gzip", made_body(20))


@pytest.mark.parametrize("cache_control", ["no-transform", "public, No-Transform, max-age=60"])
def test_no_transform_is_respected(gateway, cache_control: str) -> None:
    response = get(gateway, made(size=3000, h=[f"cache-control:{cache_control}"]), "gzip")
    assert_identity(response, made_body(3000))
    assert response.header("content-length") == "3000"


def test_a_partial_response_is_not_compressed(gateway) -> None:
    response = get(gateway, made(size=3000, status=206, h=["content-range:bytes 0-2999/9000"]), "gzip")
    assert response.status == 206
    assert_identity(response, made_body(3000))
    content_range = get(gateway, made(size=3000, h=["content-range:bytes 0-2999/3000"]), "gzip")
    assert_identity(content_range, made_body(3000))


def test_an_already_encoded_body_passes_as_it_is(gateway) -> None:
    response = get(gateway, made(size=3000, h=["content-encoding:br"]), "gzip")
    assert response.header("content-encoding") == "br"
    assert response.header("content-length") == "3000"
    assert response.body == made_body(3000)


def test_head_is_answered_as_the_upstream_did(gateway) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("HEAD", made(size=3000), {"Accept-Encoding": "gzip"})
        assert response.status == 200
        assert response.header("content-encoding") is None
        assert response.header("content-length") == "3000"
        assert conn.exchange("GET", made(size=5), {"Accept-Encoding": "gzip"}).status == 200


def test_headers_of_a_compressed_response(gateway) -> None:
    response = get(
        gateway,
        made(size=3000, h=['etag:"v1"', "accept-ranges:bytes", "vary:Origin", "last-modified:x"]),
        "gzip",
    )
    assert_compressed(response, "gzip", made_body(3000))
    assert response.header("etag") == 'W/"v1"'  # the bytes differ from the upstream's
    assert response.header("accept-ranges") is None
    assert response.header_all("vary") == ["Origin, Accept-Encoding"]
    assert response.header("last-modified") == "x"
    weak = get(gateway, made(size=3000, h=['etag:W/"v1"', "vary:accept-encoding"]), "gzip")
    assert weak.header("etag") == 'W/"v1"' and weak.header_all("vary") == ["accept-encoding"]
    star = get(gateway, made(size=3000, h=["vary:*"]), "gzip")
    assert star.header_all("vary") == ["*"]


# -- memory and backpressure -----------------------------------------------------------------------


def read_chunked_body(conn: RawConnection, sink: Callable[[bytes], None]) -> None:
    """Read a chunked body as it comes, handing each chunk's data to ``sink``."""
    while True:
        size = int(conn.read_until(b"\r\n").split(b";")[0], 16)
        if size == 0:
            assert conn.read_until(b"\r\n") == b"\r\n"
            return
        sink(conn.read_exact(size))
        assert conn.read_exact(2) == b"\r\n"


@pytest.mark.parametrize("coding", CODINGS)
def test_a_50_mb_body_is_compressed_in_flat_memory(gateway, coding: str) -> None:
    total = 50 * MiB
    pid = gateway.proc.pid
    with RawConnection(gateway.port, timeout=30) as conn:
        # Warm up: the codec loaded and a compressor made once before the baseline.
        warm = conn.exchange("GET", made(size=MiB), {"Accept-Encoding": coding})
        assert decode(coding, warm.body) == made_body(MiB)
        baseline = wait_until_steady(lambda: rss_bytes(pid))
        expected = hashlib.sha256()
        for piece in made_pieces(total, "letters"):
            expected.update(piece)
        got = hashlib.sha256()
        received = 0
        decoder = streaming_decoder(coding)

        def sink(data: bytes) -> None:
            nonlocal received
            plain = decoder(data)
            received += len(plain)
            got.update(plain)

        with RssSampler(pid, interval=0.002) as rss:  # zstd takes 50 MB in a fraction of a second
            conn.send(conn.request("GET", made(size=total, body="letters"), {"Accept-Encoding": coding}))
            head = conn.read_head()
            assert head.header("content-encoding") == coding
            read_chunked_body(conn, sink)
    assert received == total and got.hexdigest() == expected.hexdigest()
    assert rss.samples > 5
    growth = rss.peak - baseline
    assert growth < 4 * MiB, f"gateway RSS grew {growth / MiB:.1f} MB while compressing 50 MB with {coding}"


def test_a_slow_client_of_a_compressed_body_holds_the_upstream_back(gateway) -> None:
    """Noise does not compress: gzip's output is as large as its input, so a client that stops
    reading fills its socket, and the gateway must stop reading from the upstream."""
    total = 64 * MiB
    pid = gateway.proc.pid
    with RssSampler(pid) as rss, RawConnection(gateway.port, timeout=30) as conn:
        before = bytes_read(pid)
        conn.send(conn.request("GET", made("fast", size=total, body="noise"), {"Accept-Encoding": "gzip"}))
        head = conn.read_head()
        assert head.header("content-encoding") == "gzip"
        stalled_at = wait_until_steady(lambda: bytes_read(pid)) - before
        assert stalled_at < 32 * MiB, f"gateway read {stalled_at / MiB:.0f} MB for a stalled client"
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        received = 0

        def sink(data: bytes) -> None:
            nonlocal received
            received += len(decoder.decompress(data))

        read_chunked_body(conn, sink)
    assert received == total
    assert rss.peak < 150 * MiB


# -- config ----------------------------------------------------------------------------------------


def test_the_engine_calls_the_compiled_decision_directly() -> None:
    loop = asyncio.new_event_loop()
    try:
        config = load_config(
            text="routes:\n  - {path: /c, target: 'http://127.0.0.1:9', policies: {compression: {}}}\n",
            environ={},
        )
        (route,) = compile_plan(config, PoolManager(loop)).routes
    finally:
        loop.close()
    assert [type(hook.__self__) for hook in route.response_body_hooks] == [Compression]
    assert route.response_hooks == () and route.request_hooks == ()


@pytest.mark.parametrize(
    ("settings", "field", "words"),
    [
        ({"encodings": ["lzma"]}, "encodings[0]", "zstd"),
        ({"encodings": ["gzip", "gzip"]}, "encodings", "more than once"),
        ({"encodings": []}, "encodings", "at least 1"),
        ({"content_types": ["json"]}, "content_types[0]", "type/subtype"),
        ({"content_types": ["text/html", "text/*; q=1"]}, "content_types[1]", "type/subtype"),
        ({"gzip_level": 10}, "gzip_level", "9"),
        ({"brotli_level": 12}, "brotli_level", "11"),
        ({"zstd_level": 20}, "zstd_level", "19"),
        ({"min_size": -1}, "min_size", "negative"),
        ({"level": 5}, "level", "Extra inputs"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_field(settings: dict, field: str, words: str) -> None:
    route = "routes:\n  - path: /x\n    target: http://127.0.0.1:9\n    policies:\n"
    text = f"{route}      compression: {settings}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(text=text, environ={})
    message = str(caught.value)
    assert f"routes[0].policies.compression.{field}" in message
    assert words in message


def test_a_coding_whose_package_is_missing_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "brotli", None)  # import brotli now raises ImportError
    text = (
        "routes:\n  - path: /x\n    target: http://127.0.0.1:9\n"
        "    policies:\n      compression: {encodings: [gzip, br]}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(text=text, environ={})
    assert "routes[0].policies.compression.encodings[1]" in str(caught.value)
    assert "apigate[compression]" in str(caught.value)
    assert installed_codings() == ("zstd", "gzip")  # the default offers what is there


def test_sizes_take_units() -> None:
    text = (
        "routes:\n  - path: /x\n    target: http://127.0.0.1:9\n"
        "    policies:\n      compression: {min_size: 2KB}\n"
    )
    config = load_config(text=text, environ={})
    loop = asyncio.new_event_loop()
    try:
        (route,) = compile_plan(config, PoolManager(loop)).routes
    finally:
        loop.close()
    assert route.policies[0].compression.min_size == 2000


def test_media_types_match_as_configured() -> None:
    types = MediaTypes(["text/*", "+json", "application/xml"])
    assert types.matches(b"text/plain; charset=utf-8")
    assert types.matches(b"application/vnd.api+json")
    assert types.matches(b"APPLICATION/XML")
    assert not types.matches(b"text/event-stream")
    assert not types.matches(b"textplain")
    assert not types.matches(b"application/json-seq")
    assert MediaTypes(["*/*"]).matches(b"image/png")
