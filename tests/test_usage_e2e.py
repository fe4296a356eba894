"""Usage analytics end to end: a real gateway of two workers with key-auth and three consumers, on
SQLite on disk and on PostgreSQL. Known numbers of requests per consumer (successes, upstream
5xx, refused keys, request bodies) come back exactly, per minute, from `apigate usage` and from
the admin API; what a worker counted before it stops is written as it drains; bad parameters get
a clear 400 or a one-line CLI error."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests import test_store
from tests.support.errors_helpers import request, wait_until
from tests.support.gateway import GatewayProcess, free_port
from tests.support.upstream import UpstreamServer

TOKEN = "usage-admin-token"
KEYS = {
    "alice": "alice-key-0123456789",
    "bob": "bob-key-0123456789ab",
    "carol": "carol-key-0123456789",
    "probe": "probe-key-0123456789",  # only for the readiness checks, whose requests count too
}


store_url = test_store.store_url  # SQLite on disk and PostgreSQL, as the store suite runs them


def start(
    tmp_path: Path, store_url: str, upstream: UpstreamServer, flush_interval: str
) -> tuple[GatewayProcess, int]:
    admin_port = free_port()
    config = {
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": TOKEN},
        "store": {"url": store_url},
        "usage": {"enabled": True, "flush_interval": flush_interval},
        "consumers": [
            {"id": name, "tenant": f"{name}-inc", "keys": [{"key": key}]} for name, key in KEYS.items()
        ],
        "routes": [
            {
                "name": "api",
                "path": "/api/*",
                "target": upstream.url,
                "strip_prefix": True,
                "policies": {"key-auth": {}},
            }
        ],
    }
    directory = tmp_path / "gw"
    directory.mkdir()
    gateway = GatewayProcess(directory, config, workers=2).start()
    # Ready when a key is accepted (the consumer registry loaded in every worker).
    wait_until(lambda: all(call(gateway, "probe", "/api/echo") == 200 for _ in range(4)))
    return gateway, admin_port


def call(gateway: GatewayProcess, consumer: str | None, path: str, body: bytes = b"") -> int:
    headers = [("X-API-Key", KEYS[consumer] if consumer else "not-a-key-of-anyone-00")]
    return request(gateway.port, "POST" if body else "GET", path, headers, body).status


def cli(cwd: Path, store_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apigate", "usage", "--store", store_url, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def admin(port: int, path: str) -> tuple[int, Any]:
    response = request(port, "GET", path, [("Authorization", f"Bearer {TOKEN}")], host="127.0.0.1")
    return response.status, orjson.loads(response.body)


def away_from_a_minute_boundary() -> int:
    """Wait until the rest of the test's requests fit in this minute; its start (unix seconds)."""
    if time.time() % 60 > 40:
        time.sleep(60.5 - time.time() % 60)
    return int(time.time()) // 60 * 60


def by_consumer(rows: list[dict[str, Any]]) -> dict[str | None, dict[str, Any]]:
    return {row["consumer"]: row for row in rows}


def test_counts_per_consumer_and_minute_reach_the_cli_and_the_admin_api(
    tmp_path: Path, store_url: str, upstream: UpstreamServer
) -> None:
    gateway, admin_port = start(tmp_path, store_url, upstream, "200ms")
    try:
        minute = away_from_a_minute_boundary()
        started = time.time()
        statuses = [call(gateway, "alice", "/api/echo") for _ in range(7)]
        statuses += [call(gateway, "bob", "/api/echo") for _ in range(4)]
        statuses += [call(gateway, "bob", "/api/status/500") for _ in range(2)]
        statuses += [call(gateway, "carol", "/api/echo", body=b"x" * 100) for _ in range(3)]
        statuses += [call(gateway, None, "/api/echo") for _ in range(2)]
        assert statuses == [200] * 11 + [500] * 2 + [200] * 3 + [401] * 2
        assert int(time.time()) // 60 * 60 == minute, f"the requests took {time.time() - started:.1f}s"
        expected = {"alice": (7, 0, 0), "bob": (6, 0, 2), "carol": (3, 0, 0), None: (2, 2, 0)}

        window = ("--from", iso(minute), "--to", iso(minute + 60))

        def counted() -> dict[str | None, dict[str, Any]] | None:
            done = cli(tmp_path, store_url, *window, "--by", "consumer,tenant", "--json")
            assert done.returncode == 0, done.stderr
            found = by_consumer(orjson.loads(done.stdout)["rows"])
            found.pop("probe", None)
            return found if sum(row["requests"] for row in found.values()) == 18 else None

        found = wait_until(counted, timeout=20, message="the workers' counts in the store")
        assert found.keys() == expected.keys()
        for consumer, (requests, client_errors, server_errors) in expected.items():
            row = found[consumer]
            assert row["start"] == iso(minute) and row["granularity"] == "minute"
            assert row["requests"] == requests, consumer
            assert (row["client_errors"], row["server_errors"]) == (client_errors, server_errors), consumer
            assert row["tenant"] == (f"{consumer}-inc" if consumer else None)
        assert found["carol"]["bytes_in"] == 300 and found["carol"]["bytes_out"] > 0
        assert found["alice"]["latency_max_ms"] > 0

        status, body = admin(
            admin_port,
            f"/api/analytics/usage?start={iso(minute)}&end={iso(minute + 60)}&group_by=consumer,route",
        )
        assert status == 200 and body["granularity"] == "minute" and body["group_by"] == ["consumer", "route"]
        from_admin = by_consumer(body["rows"])
        from_admin.pop("probe", None)  # (in an earlier minute when the test waited for a new one)
        assert {c: (r["requests"], r["route"]) for c, r in from_admin.items()} == {
            c: (r["requests"], "api") for c, r in found.items()
        }

        status, body = admin(admin_port, "/api/analytics/errors?timeframe=1h")
        assert status == 200
        assert body["errors"] == [
            {"route": "api", "consumer": None, "status_class": "4xx", "errors": 2},
            {"route": "api", "consumer": "bob", "status_class": "5xx", "errors": 2},
        ]

        text = cli(tmp_path, store_url, *window, "--by", "consumer")
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert lines[0].split()[:4] == ["START", "STEP", "CONSUMER", "REQUESTS"]
        assert any(line.split()[2:4] == ["bob", "6"] for line in lines)
    finally:
        gateway.stop()


def test_what_the_workers_counted_is_written_when_they_stop(tmp_path: Path, upstream: UpstreamServer) -> None:
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    gateway, _ = start(tmp_path, url, upstream, "1h")
    for _ in range(5):
        assert call(gateway, "carol", "/api/echo") == 200
    assert gateway.stop() == 0
    done = cli(tmp_path, url, "--from", "-1h", "--by", "consumer", "--granularity", "total", "--json")
    assert done.returncode == 0, done.stderr
    assert by_consumer(orjson.loads(done.stdout)["rows"])["carol"]["requests"] == 5


def iso(at: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("start=yesterday", "start"),
        ("end=2026-13-01", "end"),
        ("start=-1h&end=-2h", "start"),
        ("group_by=consumer,ip", "group_by"),
        ("granularity=week", "granularity"),
        ("start=-30d&granularity=minute", "granularity"),
        ("start=-99999d", "start"),
    ],
)
def test_bad_admin_parameters_are_400_naming_the_parameter(
    admin_gateway: tuple[GatewayProcess, int], query: str, named: str
) -> None:
    status, body = admin(admin_gateway[1], f"/api/analytics/usage?{query}")
    assert status == 400 and body["error"].startswith(f"{named}: "), body


@pytest.mark.parametrize("timeframe", ["abc", "0s", "-1h", "99999d"])
def test_a_bad_timeframe_is_400(admin_gateway: tuple[GatewayProcess, int], timeframe: str) -> None:
    status, body = admin(admin_gateway[1], f"/api/analytics/errors?timeframe={timeframe}")
    assert status == 400 and body["error"].startswith("timeframe: "), body


def test_the_analytics_need_the_admin_token(admin_gateway: tuple[GatewayProcess, int]) -> None:
    response = request(admin_gateway[1], "GET", "/api/analytics/usage", host="127.0.0.1")
    assert response.status == 401


@pytest.fixture(scope="module")
def admin_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, int]]:
    from tests.support.proxy_http import running_upstream

    directory = tmp_path_factory.mktemp("usage_admin")
    with running_upstream() as upstream:
        gateway, port = start(directory, f"sqlite:///{directory / 'usage.db'}", upstream, "1s")
        try:
            yield gateway, port
        finally:
            gateway.stop()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--from", "last tuesday"], "--from"),
        (["--to", "-1x"], "--to"),
        (["--by", "consumer,ip"], "--by"),
        (["--granularity", "week"], "--granularity"),
        (["--from", "-2h", "--to", "-3h"], "--from"),
    ],
)
def test_bad_cli_parameters_are_one_line_errors(tmp_path: Path, args: list[str], named: str) -> None:
    done = cli(tmp_path, f"sqlite:///{tmp_path / 'none.db'}", *args)
    assert done.returncode == 2
    assert done.stderr.startswith(f"apigate: {named}: ") and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "none.db").exists()  # refused before the store is opened
