"""The engine as `pip install .` builds it (compiled modules) proxies like the sources do.

mypyc checks annotations at run time, so a wrong one that plain Python ignores would break only
the installed build; this runs a real gateway from a compiled build through the main paths.
The build is cached by source hash, so only the first run after an engine change compiles.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
from pathlib import Path

import orjson

from tests.support.compiled import ROOT, compiled_build
from tests.support.gateway import GatewayProcess
from tests.support.proxy_http import RawConnection
from tests.support.upstream import UpstreamServer


def test_compiled_engine_serves_the_main_paths(tmp_path: Path, upstream: UpstreamServer) -> None:
    build = compiled_build()
    env = {"PYTHONPATH": str(build)}
    where = subprocess.run(
        [sys.executable, "-c", "import apigate.engine.exchange as m; print(m.__file__)"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.endswith(".so"), f"the engine was not compiled: {where}"

    gateway = GatewayProcess(
        tmp_path,
        {
            "routes": [
                {
                    "path": "/api/*",
                    "target": upstream.url,
                    "strip_prefix": True,
                    "methods": ["GET", "HEAD", "POST"],
                },
                {"path": "/users/{id}", "target": upstream.url, "rewrite": "/echo/{id}"},
            ]
        },
        env=env,
    ).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        conn.request("GET", "/api/echo?x=1")
        response = conn.getresponse()
        echoed = orjson.loads(response.read())
        assert response.status == 200
        assert echoed["path"] == "/echo" and echoed["query"] == "x=1"
        assert response.getheader("x-request-id") == echoed["headers"]["x-request-id"]

        conn.request("POST", "/api/echo", body=b"z" * 100_000)
        response = conn.getresponse()
        assert orjson.loads(response.read())["body_length"] == 100_000

        conn.request("GET", "/api/chunked/5")
        response = conn.getresponse()
        assert response.read() == b"".join(f"chunk-{i}\n".encode() for i in range(5))

        conn.request("GET", "/users/42")
        response = conn.getresponse()
        assert orjson.loads(response.read())["path"] == "/echo/42"

        conn.request("DELETE", "/api/echo")
        response = conn.getresponse()
        assert response.status == 405 and "request_id" in orjson.loads(response.read())

        conn.request("GET", "/nowhere")
        response = conn.getresponse()
        assert response.status == 404
        response.read()
        conn.close()

        # The compiled head reader: pipelined heads, a body split across sends, bodies the
        # upstream writes apart from its head, HEAD, and what it leaves to llhttp.
        with RawConnection(gateway.port) as raw:
            post = raw.request("POST", "/api/echo", body=b"b" * 1000)
            raw.send(raw.request("GET", "/api/echo?n=1") + raw.request("HEAD", "/api/sized/10") + post[:-600])
            raw.send(post[-600:])
            assert orjson.loads(raw.read_response().body)["query"] == "n=1"
            head = raw.read_response("HEAD")
            assert head.status == 200 and head.header("content-length") == "10"
            assert orjson.loads(raw.read_response().body)["body_length"] == 1000
            raw.send(raw.request("GET", "/api/status/404") + raw.request("GET", "/api/bytes/200000"))
            assert raw.read_response().status == 404
            download = raw.read_response()
            assert download.body == b"x" * 200_000, download.body[:200]
            raw.send(raw.request("GET", "/api/chunked/3", {"X-Note": "\u00e9t\u00e9"}))
            assert raw.read_response().body == b"chunk-0\nchunk-1\nchunk-2\n"
            raw.send(b"GET /api/echo HTTP/1.1\r\nHost: x\r\nX: a\nY: b\r\n\r\n")
            assert raw.read_response().status == 400
    finally:
        assert gateway.stop() == 0, gateway.output()


def test_compiled_head_reader_agrees_with_llhttp() -> None:
    checks = "from apigate.engine import heads; from tests.test_heads import check_all; "
    checks += "assert heads.COMPILED, heads.__file__; check_all(heads)"
    done = subprocess.run(
        [sys.executable, "-c", checks],
        env={**os.environ, "PYTHONPATH": f"{compiled_build()}{os.pathsep}{ROOT}"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_compiled_policy_hot_paths_pass_the_policy_tests() -> None:
    """The compiled hot paths of headers and transform, cors, security-headers, jwt, key-auth, the
    limits (hybrid counters too), quotas, compression and the cache answer as their sources do."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{compiled_build()}{os.pathsep}{ROOT}",
        "APIGATE_EXPECT_COMPILED": "1",
    }
    where = "import apigate.policies.jwt.hotpath as m; print(m.__file__)"
    compiled = subprocess.run([sys.executable, "-c", where], env=env, capture_output=True, text=True)
    assert compiled.stdout.strip().endswith(".so"), compiled.stdout + compiled.stderr[-3000:]
    files = [
        "tests/test_policy_jwt.py",
        "tests/test_policy_key_auth.py",
        "tests/test_proxy_headers.py",
        "tests/test_policy_transform.py",
        # The JSON body mapping and the byte loops of transform, compiled (bodymap.py, jsonsplice.py,
        # hotpath.py).
        "tests/test_transform_jsonmap.py",
        "tests/test_transform_splice.py::test_spliced_bodies_are_the_parsed_bodies_byte_for_byte",
        "tests/test_transform_splice.py::test_a_compact_body_is_mapped_without_parsing",
        "tests/test_transform_splice.py::test_mappings_whose_order_matters_take_the_parsing_way",
        "tests/test_transform_hotpath.py::test_a_long_integer_is_found_as_the_regular_expression_finds_it",
        "tests/test_transform_hotpath.py::test_a_long_integer_is_found_wherever_it_lies",
        "tests/test_transform_hotpath.py::test_a_field_value_is_safe_as_the_regular_expression_said",
        "tests/test_transform_hotpath.py::test_every_byte_is_judged_as_rfc_9110_says",
        "tests/test_policy_cors.py",
        "tests/test_policy_security_headers.py",
        "tests/test_limits_algorithms.py",
        "tests/test_limits_hybrid.py",
        "tests/test_policy_rate_limit.py",
        "tests/test_policy_rate_limit_hybrid.py",
        # Quotas: the compiled calendar, and counters written behind to the store.
        "tests/test_policy_quota.py::test_periods_follow_the_calendar_of_the_zone",
        "tests/test_policy_quota.py::test_a_quota_rolls_over_at_local_midnight_on_a_dst_day",
        "tests/test_policy_quota.py::test_a_dst_day_ends_at_local_midnight",
        "tests/test_policy_quota.py::test_workers_share_a_memory_quota_through_the_store",
        # The response_body phase and compression's decision, with the engine's filtered path.
        "tests/test_response_body_phase.py",
        # Responses replaced by a response hook, and copies of a request sent for no client.
        "tests/test_response_replace.py",
        "tests/test_policy_compression.py",
        # The access log's records read by its compiled hook and their lines made in C: any value,
        # escaped or kept as it is, the same bytes as the Python reference.
        "tests/test_access_log_lines.py",
        "tests/test_access_log_render.py",
        # The cache: fresh hits answered by its compiled hooks (hotpath.py), answers made from the
        # store (304 and 204 without a length), its body filter, and the access log's field.
        "tests/test_policy_cache.py",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
