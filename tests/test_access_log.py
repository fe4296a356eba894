"""The access log: lines written by real gateway processes (2 workers) for routed, unrouted and
failed requests; credentials never written; a blocked output that costs the proxy nothing; file
rotation by size and by time on an injected clock; sampling; config errors naming the field."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from apigate.config.accesslog import FIELDS
from apigate.config.loader import ConfigError, load_config
from apigate.consumers.passwords import hash_password
from apigate.observe.accesslog import AccessLog, writer
from apigate.observe.accesslog.hotpath import LineBuffer
from apigate.observe.accesslog.lines import REDACTED, LineMaker
from apigate.observe.accesslog.pipe import WAIT_RESPAWN, LogPipe
from apigate.observe.accesslog.render import RECORD_SIZE
from apigate.observe.accesslog.writer import Destination, Sink
from tests.support.errors_helpers import ClosedPort, Response, request, wait_until
from tests.support.exchanges import request_exchange
from tests.support.gateway import GatewayProcess
from tests.support.jwks_server import HS_SECRET, claims, hs_sign
from tests.support.proxy_http import running_upstream
from tests.support.upstream import UpstreamServer

FAST_FLUSH = "50ms"
SENT_TO_A_BLOCKED_OUTPUT = 3600
# The fields every line has; the others are left out when they have no value (omit_empty).
ALWAYS_THERE = ("time", "request_id", "trace_id", "client_ip", "method", "path", "status", "duration_ms")
ALWAYS_THERE += ("bytes_in", "bytes_out", "attempts")


def read_lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_bytes() if path.exists() else b""
    return [orjson.loads(line) for line in text.splitlines()]


def lines_when(path: Path, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The log's lines once it has at least ``count`` (every line must parse as JSON)."""

    def enough() -> list[dict[str, Any]] | None:
        found = read_lines(path)
        return found if len(found) >= count else None

    return wait_until(enough, timeout)


def last_is(path: Path, request_id: str) -> list[dict[str, Any]] | None:
    """The log's lines once its last line is ``request_id``'s."""
    found = read_lines(path)
    return found if found and found[-1]["request_id"] == request_id else None


def by_request_id(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["request_id"]: line for line in lines}


def get(
    gateway: GatewayProcess, path: str, rid: str, headers: list[tuple[str, str]] | None = None
) -> Response:
    return request(gateway.port, "GET", path, [("X-Request-ID", rid), *(headers or [])])


# -- lines from a real gateway -----------------------------------------------------------------------
@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with running_upstream() as server:
        yield server


def test_lines_for_routed_unrouted_and_failed_requests_through_two_workers(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, tmp_path: Path
) -> None:
    dead = ClosedPort()
    log_path = tmp_path / "access.log"
    gateway = start_gateway(
        {
            "access_log": {"output": str(log_path), "flush_interval": FAST_FLUSH},
            "routes": [
                {"name": "api", "path": "/api/*", "target": upstream.url},
                {"name": "dead", "path": "/dead/*", "target": dead.url, "retries": 1},
                {"name": "slow", "path": "/delay/*", "target": upstream.url},
            ],
        },
        workers=2,
    )
    before = time.time()
    ok = get(gateway, "/api/echo?password=hunter2&page=3", "rid-ok")
    posted = request(gateway.port, "POST", "/api/echo", [("X-Request-ID", "rid-post")], body=b"x" * 1234)
    missing = get(gateway, "/nowhere", "rid-404")
    failed = get(gateway, "/dead/thing", "rid-502")
    assert (ok.status, posted.status, missing.status, failed.status) == (200, 200, 404, 502)
    with socket.create_connection(("127.0.0.1", gateway.port)) as gone:
        gone.sendall(b"GET /delay/3000 HTTP/1.1\r\nHost: gateway.test\r\nX-Request-ID: rid-gone\r\n\r\n")
        wait_until(lambda: any(seen.path == "/delay/3000" for seen in list(upstream.requests)))
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset

    lines = by_request_id(lines_when(log_path, 5))
    for line in lines.values():
        assert list(line) == [name for name in FIELDS if name in line]  # in order
        assert set(ALWAYS_THERE) <= set(line)  # the others only with a value (omit_empty)
        logged = datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert before - 1 <= logged.timestamp() <= time.time()
        assert line["client_ip"] == "127.0.0.1"
        assert "cache" not in line
        assert line["duration_ms"] >= 0

    routed = lines["rid-ok"]
    assert routed["method"] == "GET"
    assert routed["path"] == "/api/echo"
    assert routed["route"] == "api"
    assert routed["status"] == 200
    assert routed["upstream"] == f"127.0.0.1:{upstream.port}"
    assert 0 <= routed["upstream_ms"] <= routed["duration_ms"]
    assert routed["bytes_out"] == len(ok.body)
    assert routed["attempts"] == 1
    assert not {"tried", "error", "consumer", "limited"} & set(routed)
    assert lines["rid-post"]["bytes_in"] == 1234
    # The trace the client was told of (traceresponse: 00-<trace id>-<span>-<flags>).
    assert routed["trace_id"] == (ok.header("traceresponse") or "").split("-")[1]

    unrouted = lines["rid-404"]
    assert (unrouted.get("route"), unrouted["status"], unrouted.get("upstream")) == (None, 404, None)
    assert (unrouted["attempts"], unrouted.get("upstream_ms")) == (0, None)
    assert unrouted["bytes_out"] == len(missing.body)

    gateway_error = lines["rid-502"]
    assert (gateway_error["route"], gateway_error["status"]) == ("dead", 502)
    assert gateway_error["error"] == "connect_failed"
    assert gateway_error["attempts"] == 2
    assert gateway_error["tried"] == [f"127.0.0.1:{dead.port} connect_failed"] * 2
    assert gateway_error["upstream"] == f"127.0.0.1:{dead.port}"
    assert "upstream_ms" not in gateway_error

    abandoned = lines["rid-gone"]
    assert (abandoned["status"], abandoned["error"], abandoned["bytes_out"]) == (0, "client_closed", 0)
    assert abandoned["duration_ms"] < 3000
    dead.close()


def test_two_workers_append_whole_lines_to_one_file(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    gateway = start_gateway(
        {
            "access_log": {"output": str(log_path), "flush_interval": FAST_FLUSH},
            "routes": [{"path": "/api/*", "target": upstream.url}],
        },
        workers=2,
    )
    count = 300
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: get(gateway, "/api/echo", f"many-{i}").status, range(count)))
    assert statuses == [200] * count
    lines = lines_when(log_path, count)
    assert len(lines) == count
    assert set(by_request_id(lines)) == {f"many-{i}" for i in range(count)}


# -- credentials -----------------------------------------------------------------------------------
API_KEY = "ak-live-5f3e9c1d2b7a4e6f8091a2b3c4d5e6f7"
QUERY_KEY = "qk-live-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
WRONG_KEY = "ak-wrong-77aa88bb99cc00dd11ee22ff33aa44bb"
PASSWORD = "pw-Tr0ub4dor-horse-battery-staple"
WRONG_PASSWORD = "pw-not-it-3e8d1c0b9a8f7e6d5c4b"
COOKIE = "sess-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
CUSTOM_SECRET = "custom-7c6b5a4f3e2d1c0b9a8f7e6d"


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def test_no_credential_reaches_the_log_or_the_gateways_output(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, tmp_path: Path
) -> None:
    token = hs_sign(claims(sub="user-42"))
    forged = hs_sign(claims(sub="mallory"), secret="another-secret-that-is-long-enough-for-hs256!")
    log_path = tmp_path / "access.log"
    target = upstream.url
    gateway = start_gateway(
        {
            "store": {"url": f"sqlite:///{tmp_path / 'apigate.db'}"},
            "consumers": [
                {"id": "partner", "tenant": "acme", "keys": [{"key": API_KEY}, {"key": QUERY_KEY}]},
                {"id": "alice", "tenant": "wonderland", "password_hash": hash_password(PASSWORD)},
            ],
            "access_log": {
                "output": str(log_path),
                "flush_interval": FAST_FLUSH,
                "query": "keep",
                "headers": ["user-agent", "authorization", "x-api-key", "cookie", "x-pin"],
                "sensitive_headers": ["X-Pin"],
            },
            "routes": [
                # "k" names no secret: the log learns it from the policy that reads keys there
                # (which leaves the key in place here, for the upstream to see).
                {
                    "name": "key",
                    "path": "/key/*",
                    "target": target,
                    "policies": {"key-auth": {"query_param": "k", "hide_credentials": False}},
                },
                {
                    "name": "jwt",
                    "path": "/jwt/*",
                    "target": target,
                    "policies": {"jwt": {"algorithms": ["HS256"], "secret": HS_SECRET}},
                },
                {"name": "basic", "path": "/basic/*", "target": target, "policies": {"basic-auth": {}}},
                {"name": "limited", "path": "/limited/*", "target": target, "rate_limit": "1/min"},
                {"name": "open", "path": "/open/*", "target": target},
            ],
        },
        workers=2,
    )
    agent = [("User-Agent", "pactown-client/1.0")]
    calls = [
        ("key-header", "/key/a", [("X-API-Key", API_KEY)], 200),
        ("key-query", f"/key/a?k={QUERY_KEY}&page=2", [], 200),
        ("key-wrong", "/key/a", [("X-API-Key", WRONG_KEY)], 401),
        ("jwt", "/jwt/a", [("Authorization", f"Bearer {token}")], 200),
        ("jwt-forged", "/jwt/a", [("Authorization", f"Bearer {forged}")], 401),
        ("basic", "/basic/a", [("Authorization", basic("alice", PASSWORD))], 200),
        ("basic-wrong", "/basic/a", [("Authorization", basic("alice", WRONG_PASSWORD))], 401),
        ("cookie", "/open/a", [("Cookie", f"session={COOKIE}"), ("X-Pin", CUSTOM_SECRET)], 200),
        ("query-named", f"/open/a?access_token={token}&api_key={API_KEY}&Password={PASSWORD}", [], 200),
        ("query-shaped", f"/open/a?q={token}&next=%2Fhome", [], 200),
    ]
    for rid, path, headers, status in calls:
        assert get(gateway, path, rid, agent + headers).status == status, rid
    limited = [get(gateway, "/limited/a", f"limited-{i}").status for i in range(6)]
    assert 429 in limited

    lines = by_request_id(lines_when(log_path, len(calls) + len(limited)))
    text = log_path.read_text() + gateway.output()
    secrets = [API_KEY, QUERY_KEY, WRONG_KEY, PASSWORD, WRONG_PASSWORD, COOKIE, CUSTOM_SECRET]
    secrets += [basic("alice", PASSWORD).split()[1], basic("alice", WRONG_PASSWORD).split()[1]]
    for jwt in (token, forged):
        _, payload, signature = jwt.split(".")
        secrets += [payload, signature]
    for secret in secrets:
        assert secret not in text

    assert lines["key-header"]["consumer"] == "partner"
    assert lines["key-header"]["tenant"] == "acme"
    assert lines["key-header"]["key_id"] and lines["key-header"]["key_id"] != lines["key-query"]["key_id"]
    assert lines["key-header"]["headers"] == {
        "user-agent": "pactown-client/1.0",
        "authorization": None,
        "x-api-key": REDACTED,
        "cookie": None,
        "x-pin": None,
    }
    assert lines["key-query"]["path"] == f"/key/a?k={REDACTED}&page=2"
    assert lines["key-wrong"]["status"] == 401 and "consumer" not in lines["key-wrong"]
    assert lines["key-wrong"]["headers"]["x-api-key"] == REDACTED
    assert (lines["jwt"]["user_id"], lines["jwt"]["consumer"]) == ("user-42", "user-42")
    assert "user_id" not in lines["jwt-forged"]
    assert lines["jwt"]["headers"]["authorization"] in (REDACTED, None)  # None: stripped before proxying
    assert (lines["basic"]["consumer"], lines["basic"]["tenant"]) == ("alice", "wonderland")
    assert lines["basic-wrong"]["headers"]["authorization"] == REDACTED
    assert lines["cookie"]["headers"]["cookie"] == REDACTED
    assert lines["cookie"]["headers"]["x-pin"] == REDACTED
    assert lines["query-named"]["path"] == (
        f"/open/a?access_token={REDACTED}&api_key={REDACTED}&Password={REDACTED}"
    )
    assert lines["query-shaped"]["path"] == f"/open/a?q={REDACTED}&next=%2Fhome"
    refused = [lines[f"limited-{i}"] for i, status in enumerate(limited) if status == 429]
    assert refused and all(line["limited"] == "rate_limited" for line in refused)
    admitted = [lines[f"limited-{i}"] for i, status in enumerate(limited) if status == 200]
    assert all("limited" not in line for line in admitted)


# -- a blocked output ---------------------------------------------------------------------------------
def test_a_blocked_output_costs_the_proxy_nothing_and_drops_are_reported(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, tmp_path: Path
) -> None:
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    # A reader that never reads: the gateway's writes fill the pipe, then block.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        gateway = start_gateway(
            {
                "access_log": {"output": str(fifo), "buffer": 50, "flush_interval": FAST_FLUSH},
                "routes": [{"path": "/api/*", "target": upstream.url}],
            }
        )
        slowest = 0.0
        # ~1.6 MB of lines: more than the pipe to the writing process (1 MiB) and the fifo hold.
        for i in range(SENT_TO_A_BLOCKED_OUTPUT):
            began = time.monotonic()
            assert get(gateway, "/api/echo", f"blocked-{i}").status == 200
            slowest = max(slowest, time.monotonic() - began)
        # A loop that waited on the output would never answer again; the bound leaves room for
        # a loaded machine (1.1 s seen with four test processes on two cores).
        assert slowest < 5.0, slowest
        wait_until(lambda: "access log:" in gateway.output() and "lines dropped" in gateway.output())
        counters = orjson.loads(get(gateway, "/metrics", "metrics").body)["counters"]
        assert counters["access_log_dropped"] > 0
        assert counters["access_log_written"] < SENT_TO_A_BLOCKED_OUTPUT
        began = time.monotonic()
        assert gateway.stop() == 0
        assert time.monotonic() - began < 8.0  # the bounded wait for the blocked output, not the kill
        assert "queued lines not written at stop" in gateway.output()
    finally:
        os.close(reader)


def test_the_backlog_stays_bounded_and_drops_are_counted_while_the_output_blocks(
    tmp_path: Path, run: Any
) -> None:
    fifo = tmp_path / "blocked.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    line = "x" * 1023 + "\n"

    async def scenario() -> LogPipe:
        pipe = LogPipe(Destination(str(fifo)), buffer=100, flush_interval=0.01)
        pipe.start()
        began = time.monotonic()
        for _ in range(5000):
            pipe.lines.put(premade(line))
            pipe.flush()
            assert pipe.backlog_lines <= 100
        assert time.monotonic() - began < 2.0  # put and flush never wait for the output
        # What went on fits in the writing process's pipe (1 MiB), the chunk it read last (at most
        # READ_SIZE, 1 MiB; how much it took before the fifo filled depends on the machine's load)
        # and the fifo (64 KiB): at most ~2,100 lines of 1 KiB; the rest was dropped and counted.
        assert 5000 - pipe.overflowed - pipe.backlog_lines <= 2200
        assert pipe.overflowed >= 5000 - 100 - 2200
        began = time.monotonic()
        assert await pipe.stop(0.3) > 0  # the output still blocks: the process is killed
        assert time.monotonic() - began < 2.0
        return pipe

    try:
        pipe = run(scenario())
    finally:
        os.close(reader)
    assert pipe.written <= 64  # what the fifo took before it blocked
    assert pipe.written + pipe.dropped == 5000  # every line is counted, one way or the other


def test_a_failing_output_loses_lines_counted_and_keeps_its_error(run: Any) -> None:
    async def scenario() -> LogPipe:
        pipe = LogPipe(Destination("/dev/full"), buffer=1000, flush_interval=0.01)
        pipe.start()
        for _ in range(10):
            pipe.lines.put(premade('{"a":1}\n'))
        pipe.flush()
        await async_wait_until(lambda: (pipe.flush(), pipe.lost)[1] == 10)
        assert pipe.error is not None and os.strerror(errno.ENOSPC) in pipe.error
        assert await pipe.stop(5.0) == 0
        return pipe

    pipe = run(scenario())
    assert (pipe.written, pipe.dropped) == (0, 10)


def test_stop_writes_what_is_buffered(tmp_path: Path, run: Any) -> None:
    path = tmp_path / "access.log"

    async def scenario() -> LogPipe:
        pipe = LogPipe(Destination(str(path)), buffer=10_000, flush_interval=60.0)
        pipe.start()
        for i in range(500):
            pipe.lines.put(premade(f'{{"n":{i}}}\n'))
        assert await pipe.stop(5.0) == 0
        return pipe

    pipe = run(scenario())
    assert [line["n"] for line in read_lines(path)] == list(range(500))
    assert (pipe.written, pipe.dropped) == (500, 0)


def test_a_killed_writing_process_is_replaced_and_its_lines_counted(tmp_path: Path, run: Any) -> None:
    path = tmp_path / "access.log"

    async def scenario() -> LogPipe:
        pipe = LogPipe(Destination(str(path)), buffer=10_000, flush_interval=60.0)
        pipe.start()
        pipe.lines.put(premade('{"n":1}\n'))
        pipe.flush()
        await async_wait_until(lambda: (pipe.flush(), pipe.written)[1] == 1)
        first = pipe.process
        assert first is not None
        first.child.kill()
        await asyncio.to_thread(first.child.wait)
        await asyncio.sleep(WAIT_RESPAWN)  # (a process that ended is replaced at most once a second)
        pipe.lines.put(premade('{"n":2}\n'))
        pipe.flush()
        await async_wait_until(lambda: (pipe.flush(), pipe.written)[1] == 2)
        assert pipe.process is not first
        assert await pipe.stop(5.0) == 0
        return pipe

    pipe = run(scenario())
    assert [line["n"] for line in read_lines(path)] == [1, 2]
    assert (pipe.written, pipe.dropped) == (2, 0)


async def async_wait_until(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.01)
    return found


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def numbered(start: int, count: int, width: int = 100) -> list[bytes]:
    return [(b'{"n":%d,"pad":"' % i).ljust(width - 3, b"x") + b'"}\n' for i in range(start, start + count)]


def batch(start: int, count: int) -> tuple[bytes, int]:
    """What the writing process gives its Sink: the lines of a batch and their number."""
    return b"".join(numbered(start, count)), count


def rotated_files(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name + ".2"))


def numbers_in(*paths: Path) -> list[int]:
    return [line["n"] for p in paths for line in read_lines(p)]


def test_rotation_by_size_keeps_each_file_under_the_limit_and_every_line(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    clock = FakeClock(datetime(2026, 12, 5, 10, 0, tzinfo=UTC).timestamp())
    sink = Sink(Destination(str(path), max_bytes=1000, keep=100), clock)
    written = 0
    for size in (7, 3, 12, 1, 25, 2):
        sink.write(*batch(written, size))
        written += size
        clock.now += 0.5
    sink.close()
    files = rotated_files(path)
    assert len(files) == 4  # 50 lines of 100 bytes, 10 to a file
    assert all(p.stat().st_size <= 1000 for p in [*files, path])
    assert numbers_in(*files, path) == list(range(written))
    # Rotated at 10:00:01 (the third write), twice: the second name takes a sequence number.
    stamp = "access.log.20261205T100001.000Z"
    assert [p.name for p in files[:2]] == [stamp, f"{stamp}-001"]


def test_rotation_keeps_only_the_newest_files(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    clock = FakeClock(datetime(2026, 12, 5, 10, 0, tzinfo=UTC).timestamp())
    sink = Sink(Destination(str(path), max_bytes=1024, keep=2), clock)
    for i in range(20):
        sink.write(*batch(i * 10, 10))  # a file's worth each time: one rotation per write
    sink.close()
    files = rotated_files(path)
    assert len(files) == 2
    assert numbers_in(*files, path) == list(range(170, 200))  # same-time names sort in order


def test_rotation_by_time_at_each_boundary_of_the_period(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    clock = FakeClock(datetime(2026, 12, 5, 10, 59, 58, tzinfo=UTC).timestamp())
    sink = Sink(Destination(str(path), every=3600.0, keep=10), clock)
    sink.write(*batch(0, 3))
    clock.now += 1.5  # 10:59:59.5: the same hour
    sink.write(*batch(3, 3))
    assert rotated_files(path) == []
    clock.now += 1.0  # 11:00:00.5
    sink.write(*batch(6, 2))
    (first,) = rotated_files(path)
    assert first.name == "access.log.20261205T110000.500Z"
    assert numbers_in(first) == list(range(6))
    assert numbers_in(path) == [6, 7]
    clock.now += 7200  # 13:00:00.5: two boundaries passed, one rotation
    sink.write(*batch(8, 1))
    sink.close()
    assert len(rotated_files(path)) == 2
    assert numbers_in(path) == [8]


def test_a_file_left_from_an_earlier_period_is_rotated_on_the_first_write(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_bytes(b"".join(numbered(0, 2)))
    yesterday = datetime(2026, 12, 4, 23, 0, tzinfo=UTC).timestamp()
    os.utime(path, (yesterday, yesterday))
    clock = FakeClock(datetime(2026, 12, 5, 8, 0, tzinfo=UTC).timestamp())
    sink = Sink(Destination(str(path), every=86400.0), clock)
    sink.write(*batch(2, 1))
    sink.close()
    (old,) = rotated_files(path)
    assert (numbers_in(old), numbers_in(path)) == ([0, 1], [2])


def test_workers_sharing_a_rotated_file_lose_no_line(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    clock = FakeClock(datetime(2026, 12, 5, 10, 0, tzinfo=UTC).timestamp())
    destination = Destination(str(path), max_bytes=1000, keep=100)
    first, second = Sink(destination, clock), Sink(destination, clock)
    for i in range(30):  # each rotates in turn; the other follows the path to the new file
        (first if i % 2 else second).write(*batch(i * 4, 4))
        clock.now += 0.25
    first.close()
    second.close()
    files = [*rotated_files(path), path]
    assert all(p.stat().st_size <= 1000 for p in files)
    assert sorted(numbers_in(*files)) == list(range(120))


def test_a_file_renamed_from_outside_is_opened_again(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    sink = Sink(Destination(str(path)))
    sink.write(*batch(0, 2))
    path.rename(tmp_path / "access.log.1")  # as logrotate does
    sink.write(*batch(2, 2))
    sink.close()
    assert numbers_in(tmp_path / "access.log.1") == [0, 1]
    assert numbers_in(path) == [2, 3]


def read_all_in_a_thread(fifo: Path, executor: ThreadPoolExecutor, stop_after: int | None = None) -> Any:
    """A reader of ``fifo``; its future gives what it read, until the writer closed it or
    ``stop_after`` bytes (then it closes its end)."""

    def read() -> bytes:
        reader = os.open(fifo, os.O_RDONLY)  # (waits for the writer: no end of input before it)
        chunks: list[bytes] = []
        got = 0
        try:
            while stop_after is None or got < stop_after:
                chunk = os.read(reader, 65536 if stop_after is None else min(65536, stop_after - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        finally:
            os.close(reader)
        return b"".join(chunks)

    return executor.submit(read)


def test_a_batch_to_a_pipe_goes_in_pieces_of_whole_lines(tmp_path: Path, monkeypatch: Any) -> None:
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    long_line = b'{"n":100,"pad":"' + b"y" * 10_000 + b'"}\n'  # longer than PIPE_BUF: written alone
    data, count = batch(0, 100)
    data += long_line + b"".join(numbered(101, 5))
    sink = Sink(Destination(str(fifo)))
    writes: list[bytes] = []
    real_write = os.write

    def recorded(fd: int, chunk: Any) -> int:
        if fd == sink.fd:
            writes.append(bytes(chunk))
        return real_write(fd, chunk)

    with ThreadPoolExecutor(1) as executor:
        received = read_all_in_a_thread(fifo, executor)
        monkeypatch.setattr(writer.os, "write", recorded)
        sink.write(data, count + 6)
        monkeypatch.undo()
        assert sink.written_lines == 106
        sink.close()
        assert received.result(timeout=10) == data
    # Pieces the kernel never interleaves with another writer's: at most PIPE_BUF bytes, whole
    # lines; the long line alone, in as many writes as the pipe takes it.
    assert b"".join(writes) == data
    long_start = data.index(long_line)
    ends = [sum(map(len, writes[: i + 1])) for i in range(len(writes))]
    for size, end in zip(map(len, writes), ends, strict=True):
        inside_long_line = long_start < end <= long_start + len(long_line)
        assert inside_long_line or (size <= select.PIPE_BUF and data[end - 1 : end] == b"\n")
    assert long_start in [0, *ends] and long_start + len(long_line) in ends


def test_batches_cut_by_a_full_pipe_reach_the_same_writing_process_whole(tmp_path: Path, run: Any) -> None:
    fifo = tmp_path / "slow.fifo"
    os.mkfifo(fifo)
    # ~3.6 MB in batches of ~310 KB: the 1 MiB pipe fills, and the batch that meets its end goes
    # in part (the rest when the pipe has room again).
    lines = [f'{{"n":{i},"pad":"{"z" * 1200}"}}\n' for i in range(3000)]

    async def scenario() -> LogPipe:
        pipe = LogPipe(Destination(str(fifo)), buffer=10_000, flush_interval=0.01)
        pipe.start()
        cut = False
        for line in lines:  # the writing process waits for a reader: the pipe fills, batches wait
            pipe.lines.put(premade(line))
            cut = cut or bool(pipe.partial)
        pipe.flush()
        assert cut and pipe.backlog_lines > 0 and pipe.overflowed == 0
        assert pipe.process is not None
        child = pipe.process.child
        with ThreadPoolExecutor(1) as executor:
            received = read_all_in_a_thread(fifo, executor)
            try:
                await async_wait_until(lambda: (pipe.flush(), pipe.written)[1] == len(lines))
                assert await pipe.stop(5.0) == 0
            finally:  # (a process left writing would keep the reader waiting)
                child.kill()
            assert received.result(timeout=10).decode() == "".join(lines)
        return pipe

    pipe = run(scenario())
    assert (pipe.written, pipe.dropped) == (3000, 0)


def test_a_pipe_closed_inside_a_batch_counts_the_lines_of_the_pieces_that_went(tmp_path: Path) -> None:
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    lines = [b"%04d" % i + b"x" * 995 + b"\n" for i in range(1000)]  # 1,000 bytes: 4 to a piece
    with ThreadPoolExecutor(1) as executor:
        received = read_all_in_a_thread(fifo, executor, stop_after=10_000)
        sink = Sink(Destination(str(fifo)))
        with pytest.raises(BrokenPipeError):
            sink.write(b"".join(lines), len(lines))
        sink.close()
        assert len(received.result(timeout=10)) == 10_000
    # The pipe took what it holds before the reader left; what failed was counted unwritten.
    assert 10 <= sink.written_lines < 1000
    assert sink.written_lines % 4 == 0


def test_a_batch_cut_short_by_the_end_of_the_input_keeps_its_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    lines = numbered(0, 3)
    sent = lines[0] + lines[1][:40]  # the gateway ended inside the second line
    status_read, status_write = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-I", writer.__file__, str(status_write), json.dumps([str(path), None, None, 7])],
        stdin=subprocess.PIPE,
        pass_fds=(status_write,),
    )
    os.close(status_write)
    assert child.stdin is not None
    child.stdin.write(writer.BATCH_HEADER.pack(len(b"".join(lines)), 3) + sent)
    child.stdin.close()
    assert child.wait(timeout=10) == 0
    with os.fdopen(status_read, "rb") as status:
        reports = status.read().splitlines()
    assert reports[-1] == b"1 2 "  # one line written, two lost
    assert numbers_in(path) == [0]


# -- lines made in process: sampling, query, reloads ----------------------------------------------------
def config_of(**access_log: Any) -> Any:
    return load_config(text=orjson.dumps({"access_log": access_log}).decode())


def into(lines: list[str]) -> LineBuffer:
    """A buffer that hands each line to ``lines`` at once."""
    return LineBuffer(1, lambda data, _count: lines.extend(data.decode().splitlines(keepends=True)))


def premade(line: str) -> tuple[Any, ...]:
    """A record whose line is ``line`` (its ``choose`` gives it): the pipe's tests send lines of
    their own sizes and contents."""
    values: list[Any] = [None] * RECORD_SIZE
    values[:13] = (
        False,
        lambda _whole: line.encode(),
        time.monotonic(),
        0,
        b"r",
        b"r",
        "ip",
        "GET",
        "/",
        200,
        0,
        0,
        1,
    )
    return tuple(values)


def finished(
    status: int, path: str = "/a", query: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
) -> Any:
    exchange = request_exchange([(b"host", b"gateway.test"), *(headers or [])], path=path, query=query)
    exchange.response_status = status
    exchange.t_end = exchange.t_start + 0.002
    return exchange


def test_sampling_writes_every_error_and_a_ratio_of_successes() -> None:
    lines: list[str] = []
    maker = LineMaker(config_of(sample=0.25).access_log, into(lines), chance=random.Random(7).random)
    for _ in range(10_000):
        maker(finished(200))
    successes = len(lines)
    # Binomial(10000, 0.25): sd 43.3; six of them either side.
    assert 2240 <= successes <= 2760
    for status in (400, 404, 429, 500, 502, 504):
        for _ in range(100):
            maker(finished(status))
    failed = finished(200)
    failed.failure = "aborted"  # a response cut short is an error whatever its status
    maker(failed)
    assert len(lines) == successes + 601


def test_the_writing_process_is_left_to_its_worker_by_stop_signals(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, tmp_path: Path
) -> None:
    """A stop signal to the whole process group (systemd, Ctrl-C) reaches the writing process too:
    it must not end before its worker sent it the last lines."""
    log_path = tmp_path / "access.log"
    gateway = start_gateway(
        {
            "access_log": {"output": str(log_path), "flush_interval": FAST_FLUSH},
            "routes": [{"path": "/api/*", "target": upstream.url}],
        }
    )
    assert get(gateway, "/api/echo", "first").status == 200
    wait_until(lambda: last_is(log_path, "first"))
    [writer_pid] = gateway.helpers("apigate-log")
    os.kill(writer_pid, signal.SIGTERM)
    os.kill(writer_pid, signal.SIGINT)
    assert get(gateway, "/api/echo", "second").status == 200
    wait_until(lambda: last_is(log_path, "second"))  # (it ran since: the signals were delivered)
    assert gateway.helpers("apigate-log") == [writer_pid]
    assert [line["request_id"] for line in read_lines(log_path)] == ["first", "second"]


def test_sample_zero_writes_only_errors_from_a_gateway(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    gateway = start_gateway(
        {
            "access_log": {"output": str(log_path), "sample": 0, "flush_interval": FAST_FLUSH},
            "routes": [
                {"path": "/api/*", "target": upstream.url},
                {"path": "/status/*", "target": upstream.url},
            ],
        }
    )
    for i in range(20):
        assert get(gateway, "/api/echo", f"fine-{i}").status == 200
    assert get(gateway, "/status/503", "upstream-503").status == 503
    assert get(gateway, "/missing", "missing").status == 404
    # One worker writes its lines in order: once the last is there, every earlier one would be.
    lines = wait_until(lambda: last_is(log_path, "missing"))
    assert [line["request_id"] for line in lines] == ["upstream-503", "missing"]


def test_with_omit_empty_off_every_field_is_written_in_order_with_nulls() -> None:
    exchange = finished(200, "/p")
    line = LineMaker(config_of(omit_empty=False).access_log, into([])).record(exchange)
    assert tuple(line) == FIELDS
    assert (line["consumer"], line["cache"], line["error"], line["route"]) == (None,) * 4
    lean = LineMaker(config_of().access_log, into([])).record(exchange)
    del line["time"], lean["time"]  # (the milliseconds may turn between the two)
    assert lean == {name: value for name, value in line.items() if value is not None}


def test_query_is_dropped_by_default_and_redacted_when_kept() -> None:
    query = (
        b"page=2&api_key=s1&X-Signature=s2&%61ccess_token=s3&k=s4&refresh=eyJhbGciOi.eyJzdWIi.c2ln"
        b"&eyJhbGciOi.eyJzdWIi.c2ln&flag&my_session_id=s5"
    )
    dropped: list[str] = []
    LineMaker(config_of().access_log, into(dropped))(finished(200, "/p", query))
    assert orjson.loads(dropped[0])["path"] == "/p"

    kept: list[str] = []
    config = config_of(query="keep", redact_params=["Cursor"]).access_log
    maker = LineMaker(config, into(kept), secret_params=["k"])
    maker(finished(200, "/p", query + b"&cursor=c1"))
    assert orjson.loads(kept[0])["path"] == (
        "/p?page=2&api_key=[redacted]&X-Signature=[redacted]&%61ccess_token=[redacted]&k=[redacted]"
        "&refresh=[redacted]&[redacted]&flag&my_session_id=[redacted]&cursor=[redacted]"
    )


def test_a_token_in_the_path_is_redacted() -> None:
    lines: list[str] = []
    token = hs_sign(claims(sub="user-42"))
    LineMaker(config_of().access_log, into(lines))(finished(200, f"/login/{token}/done"))
    assert orjson.loads(lines[0])["path"] == f"/login/{REDACTED}/done"


def test_fields_can_be_chosen_and_listed_headers_named_like_secrets_are_redacted() -> None:
    lines: list[str] = []
    listed = ["User-Agent", "X-Hub-Signature-256", "X-Shopify-Hmac-Sha256", "Api-Key", "X-Device", "Accept"]
    config = config_of(fields=["status", "method", "request_id"], headers=listed).access_log
    sent = [
        (b"user-agent", b"pactown/2"),
        (b"x-hub-signature-256", b"sha256=0f1e"),
        (b"x-shopify-hmac-sha256", b"q83v"),
        (b"api-key", b"k-123"),
        (b"x-device", b"d-9"),
        (b"x-device", b"d-10"),
    ]
    LineMaker(config, into(lines), secret_headers=["X-Device"])(finished(204, headers=sent))
    line = orjson.loads(lines[0])
    assert list(line) == ["status", "method", "request_id", "headers"]
    assert line["headers"] == {
        "user-agent": "pactown/2",
        "x-hub-signature-256": REDACTED,
        "x-shopify-hmac-sha256": REDACTED,
        "api-key": REDACTED,
        "x-device": REDACTED,  # a header a policy reads credentials from
        "accept": None,
    }


def test_a_reload_moves_the_log_to_its_new_output(tmp_path: Path, run: Any) -> None:
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    access_log = AccessLog()
    config = config_of(output=str(first), flush_interval="10ms")
    assert AccessLog().apply(load_config(text="")) is None  # off unless configured

    async def scenario() -> None:
        hook = access_log.apply(config)
        assert hook is not None
        await access_log.start(config, None)  # type: ignore[arg-type]
        hook(finished(200))
        await asyncio.to_thread(lines_when, first, 1)
        hook = access_log.apply(config_of(output=str(second), flush_interval="10ms"))
        assert hook is not None
        hook(finished(201))
        await access_log.stop()

    run(scenario())
    assert [line["status"] for line in read_lines(first)] == [200]
    assert [line["status"] for line in read_lines(second)] == [201]
    assert (access_log.written, access_log.dropped) == (2, 0)


# -- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("section", "field", "words"),
    [
        ({"sample": 1.5}, "access_log.sample", "less than or equal to 1"),
        ({"buffer": 0}, "access_log.buffer", "greater than or equal to 1"),
        ({"flush_interval": "soon"}, "access_log.flush_interval", "duration"),
        ({"query": "maybe"}, "access_log.query", "'drop' or 'keep'"),
        ({"fields": ["time", "password"]}, "access_log.fields", "is not a field"),
        ({"fields": []}, "access_log.fields", "at least one field"),
        ({"fields": ["time", "time"]}, "access_log.fields", "listed twice"),
        ({"headers": ["bad header"]}, "access_log.headers", "not a valid header name"),
        ({"output": ""}, "access_log.output", "stdout or a file path"),
        ({"rotate": {"max_bytes": "10MB"}}, "access_log", "rotate needs a file output"),
        ({"output": "/tmp/a.log", "rotate": {}}, "access_log.rotate", "max_bytes, every or both"),
        ({"output": "/tmp/a.log", "rotate": {"every": "weekly"}}, "access_log.rotate.every", "hourly, daily"),
        ({"output": "/tmp/a.log", "rotate": {"max_bytes": 10}}, "access_log.rotate.max_bytes", "1KB"),
        ({"output": "/tmp/a.log", "rotate": {"max_bytes": "1MB", "keep": 0}}, "access_log.rotate.keep", "1"),
        ({"output": "/tmp/a.log", "rotate": {"every": "1h", "kept": 3}}, "access_log.rotate.kept", "Extra"),
    ],
)
def test_bad_config_names_the_field(section: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(text=orjson.dumps({"access_log": section}).decode())
    assert len(caught.value.issues) == 1
    assert f"{field}: " in str(caught.value)
    assert words in str(caught.value)
