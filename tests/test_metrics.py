"""Metrics end to end: a real gateway of two workers, a real upstream that sleeps known amounts.

Whatever process answers (either worker on the proxy listener, the node on the admin listener),
the counts are the requests this test sent, by route, method and status; the Prometheus text
parses with the official client's parser; the latency percentiles are within the sketch's stated
relative error of the exact order statistics, which the test bounds from below by the upstream's
sleeps and from above by its own timings of each request.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apigate.engine.metrics import RELATIVE_ERROR
from tests.support.errors_helpers import request, wait_until
from tests.support.gateway import GatewayProcess, free_port
from tests.support.upstream import UpstreamServer
from tests.support.webhook_handler import WebhookHandler
from tests.support.webhook_sender import Sender, github_source

ADMIN_TOKEN = "admin-token-for-metrics"
ENDPOINT_TOKEN = "endpoint-token-for-metrics"
KEYS = {
    "acme": "acme-key-0123456789abcdef0123",
    "globex": "globex-key-0123456789abcdef01",
    "initech": "initech-key-0123456789abcdef0",
}
# The latency distribution: (sleep in ms, requests); sorted percentiles fall on plateaus and edges.
SLEEPS = ((2, 40), (15, 30), (40, 20), (90, 8), (150, 2))


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, int, UpstreamServer]]:
    tmp = tmp_path_factory.mktemp("metrics")
    upstream = UpstreamServer().start()
    admin_port = free_port()
    config = {
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": ADMIN_TOKEN},
        "endpoints": {"token": ENDPOINT_TOKEN, "metrics_prometheus": "/metrics/prometheus"},
        "metrics": {"consumers": 2},
        "store": {"url": f"sqlite:///{tmp / 'gateway.db'}"},
        "consumers": [{"id": name, "keys": [{"key": key}]} for name, key in KEYS.items()],
        "upstreams": {"backend": {"targets": [upstream.url]}},
        "routes": [
            {"name": "sleepy", "path": "/delay/{ms}", "upstream": "backend", "retries": 0},
            {"name": "echo", "path": "/echo/*", "upstream": "backend", "methods": ["GET", "POST"]},
            {"name": "limited", "path": "/limited/*", "target": upstream.url, "rate_limit": "3/min"},
            {"name": "keyed", "path": "/keyed/*", "target": upstream.url, "policies": {"key-auth": {}}},
        ],
    }
    process = GatewayProcess(tmp, config, workers=2).start()

    def linked() -> bool:
        status, body = _admin_json(admin_port, "/api/metrics")
        return status == 200 and body["workers"] == 2

    try:
        wait_until(linked, timeout=15, message="both workers linked to the node")
        yield process, admin_port, upstream
    finally:
        process.stop()
        upstream.stop()


def _admin_json(port: int, path: str, token: str = ADMIN_TOKEN) -> tuple[int, Any]:
    response = request(port, "GET", path, headers=_bearer(token), host="127.0.0.1")
    return response.status, orjson.loads(response.body) if response.body else None


def _families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def _sample(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    values = [s.value for s in families[family].samples if s.name == sample and s.labels == labels]
    assert len(values) == 1, (family, sample, labels, families[family].samples)
    return values[0]


def _timed_get(port: int, path: str, headers: list[tuple[str, str]] | None = None) -> tuple[int, float, int]:
    started = time.monotonic()
    response = request(port, "GET", path, headers=headers)
    return response.status, time.monotonic() - started, len(response.body)


def test_counts_and_percentiles_agree_with_what_was_sent(
    gateway: tuple[GatewayProcess, int, UpstreamServer],
) -> None:
    process, admin_port, _upstream = gateway
    port = process.port
    sleeps = [ms for ms, count in SLEEPS for _ in range(count)]
    # Each request on a new connection, eight at a time: both workers take some.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        timed = list(pool.map(lambda ms: (ms, *_timed_get(port, f"/delay/{ms}")), sleeps))
    assert all(status == 200 for _ms, status, _seconds, _size in timed)
    posts = [request(port, "POST", "/echo/x", body=b"x" * size).status for size in (10, 500, 5000)]
    gets = [request(port, "GET", "/echo/y").status for _ in range(4)]
    limited = collections.Counter(request(port, "GET", "/limited/a").status for _ in range(12))
    keyed = collections.Counter(
        request(port, "GET", "/keyed/a", headers=headers).status
        for headers in [
            [],
            [],
            [("X-API-Key", "wrong-key-0123456789abcdef0123")],
            *[[("X-API-Key", KEYS["acme"])]] * 3,
            [("X-API-Key", KEYS["globex"])],
            [("X-API-Key", KEYS["initech"])],
        ]
    )
    missing = [request(port, "GET", "/nowhere").status for _ in range(3)]
    assert posts == [200] * 3 and gets == [200] * 4 and missing == [404] * 3
    assert limited[429] >= 6 and limited[200] + limited[429] == 12  # 3 a minute in each worker
    assert keyed == {401: 3, 200: 5}

    status, view = _admin_json(admin_port, "/api/metrics")
    assert status == 200 and view["workers"] == 2
    routes = view["routes"]
    assert routes["sleepy"]["requests"] == 100 and routes["sleepy"]["responses"] == {"2xx": 100}
    assert routes["echo"]["requests"] == 7
    assert routes["limited"]["responses"] == {"2xx": limited[200], "4xx": limited[429]}
    assert routes["limited"]["rate_limited"] == limited[429]
    assert routes["keyed"]["auth_failures"] == 3
    assert view["unrouted"]["responses"]["4xx"] == 3
    assert view["rate_limited"] == limited[429] and view["auth_failures"] == 3

    # Percentiles: exact order statistic of rank floor(q (n - 1)), bounded by sleep and client time.
    ordered_sleeps = sorted(ms for ms, _s, _t, _b in timed)
    ordered_client = sorted(seconds * 1000 for _ms, _s, seconds, _b in timed)
    latency = routes["sleepy"]["latency_ms"]
    for window in ("since_start", "last_minute"):
        assert latency[window]["count"] == 100
        for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            rank = math.floor(q * 99)
            low = ordered_sleeps[rank] * (1 - RELATIVE_ERROR)
            high = ordered_client[rank] * (1 + RELATIVE_ERROR) + 0.001  # (rounded to microseconds)
            assert low <= latency[window][name] <= high, (window, name, latency[window][name], low, high)
    backend = view["upstreams"]["backend"]
    target_requests = sum(t["requests"] for t in backend["targets"].values())
    assert target_requests == 107  # every response of the upstream group, sleepy and echo
    assert {c["key"]: c["requests"] for c in view["top_clients"]["consumer"]} == {
        "acme": 3,
        "globex": 1,
        "initech": 1,
    }
    assert view["top_clients"]["ip"] == [{"key": "127.0.0.1", "requests": view["requests_total"]}]

    # The Prometheus text on the admin listener and, with the endpoint token, on the proxy listener.
    admin_text = request(admin_port, "GET", "/metrics", headers=_bearer(ADMIN_TOKEN), host="127.0.0.1")
    proxy_text = request(port, "GET", "/metrics/prometheus", headers=_bearer(ENDPOINT_TOKEN))
    assert admin_text.status == proxy_text.status == 200
    assert admin_text.header("content-type").startswith("text/plain; version=0.0.4")
    for text in (admin_text.body.decode(), proxy_text.body.decode()):
        families = _families(text)
        total = "apigate_requests_total"
        assert _sample(families, "apigate_requests", total, route="sleepy", method="GET", status="200") == 100
        assert _sample(families, "apigate_requests", total, route="echo", method="POST", status="200") == 3
        assert _sample(families, "apigate_requests", total, route="echo", method="GET", status="200") == 4
        assert (
            _sample(families, "apigate_requests", total, route="limited", method="GET", status="429")
            == limited[429]
        )
        assert _sample(families, "apigate_requests", total, route="keyed", method="GET", status="401") == 3
        assert _sample(families, "apigate_requests", total, route="", method="GET", status="404") == 3
        assert (
            _sample(families, "apigate_rate_limited", "apigate_rate_limited_total", route="limited")
            == limited[429]
        )
        auth = "apigate_auth_failures_total"
        assert _sample(families, "apigate_auth_failures", auth, route="keyed", reason="missing_key") == 2
        assert _sample(families, "apigate_auth_failures", auth, route="keyed", reason="invalid_key") == 1
        duration = "apigate_request_duration_seconds"
        assert _sample(families, duration, f"{duration}_count", route="sleepy") == 100
        assert _sample(families, duration, f"{duration}_bucket", route="sleepy", le="0.001") == 0
        assert _sample(families, duration, f"{duration}_bucket", route="sleepy", le="+Inf") == 100
        # A bucket holds at least the requests the client saw end within its bound, and at most
        # those whose sleep fits in it.
        for le in ("0.005", "0.025", "0.05", "0.1", "0.25"):
            bound = float(le) * 1000
            at_least = sum(1 for ms in ordered_client if ms <= bound)
            at_most = sum(1 for ms in ordered_sleeps if ms <= bound)
            bucket = _sample(families, duration, f"{duration}_bucket", route="sleepy", le=le)
            assert at_least <= bucket <= at_most, (le, at_least, bucket, at_most)
        size = "apigate_request_size_bytes"
        assert _sample(families, size, f"{size}_sum", route="echo") == 5510
        upstream_latency = "apigate_upstream_latency_seconds"
        target = {"upstream": "backend", "target": _upstream.url}
        assert _sample(families, upstream_latency, f"{upstream_latency}_count", **target) == 107
        consumers = "apigate_consumer_requests"
        assert _sample(families, consumers, f"{consumers}_total", consumer="acme") == 3
        # The limit is 2 consumers by name: the third counts as _other.
        assert sum(s.value for s in families[consumers].samples) == 5
        assert _sample(families, "apigate_workers", "apigate_workers") == 2

    # /stats keeps the Pactown gateway's fields, merged: the same from every worker.
    stats = [
        orjson.loads(request(port, "GET", "/stats", headers=_bearer(ENDPOINT_TOKEN)).body) for _ in range(6)
    ]
    for answer in stats:
        for field in ("requests_total", "requests_cached", "requests_rate_limited", "webhooks_received"):
            assert isinstance(answer[field], int)
        for field in ("errors", "started_at", "cache_size", "rate_limit_keys"):
            assert field in answer
        assert answer["requests_rate_limited"] == limited[429] and answer["workers"] == 2
        assert answer["rate_limit_keys"] in (1, 2)  # one client IP, in each worker that counted it
        assert answer["routes"]["sleepy"] == 100


def test_webhook_intake_deliveries_and_dead_letters_are_counted(tmp_path: Path) -> None:
    """Two sources: one delivers, one's destination refuses every attempt until it is dead."""
    refusing = socket.socket()  # bound, never listening: every delivery attempt is refused
    refusing.bind(("127.0.0.1", 0))
    handler = WebhookHandler().start()
    admin_port = free_port()
    config = {
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": ADMIN_TOKEN},
        "store": {"url": f"sqlite:///{tmp_path / 'store.db'}"},
        "webhooks": {
            "poll_interval": "50ms",
            "sources": {"github": github_source(["ledger"]), "backup": github_source(["vault"])},
            "destinations": {
                "ledger": {"url": handler.url, "timeout": "2s"},
                "vault": {
                    "url": f"http://127.0.0.1:{refusing.getsockname()[1]}",
                    "timeout": "1s",
                    "retry": {"schedule": [0, "50ms"], "jitter": 0},
                },
            },
        },
    }
    process = GatewayProcess(tmp_path, config, workers=2).start()
    try:
        github = Sender(process.port, "/webhooks/github")
        backup = Sender(process.port, "/webhooks/backup")
        assert [github.send(f"g-{n}")[0] for n in range(4)] == [200] * 4
        assert github.send("g-0")[0] == 200  # a duplicate, acknowledged again
        assert [backup.send(f"b-{n}")[0] for n in range(2)] == [200] * 2
        handler.wait_for(lambda seen: len(seen) >= 4)

        def settled() -> dict[str, Any] | None:
            status, view = _admin_json(admin_port, "/api/metrics")
            sources = view["webhooks"]["sources"] if status == 200 else {}
            done = sources.get("backup", {}).get("dead_letters") == 2 and sources["github"]["delivered"] == 4
            return view if done else None

        view = wait_until(settled, timeout=20, message="deliveries done and dead letters counted")
        assert view["webhooks"]["received"] == 7
        assert view["webhooks"]["sources"]["github"] == {
            "received": 4, "duplicates": 1, "delivered": 4, "failed": 0, "backlog": 0, "dead_letters": 0,
        }  # fmt: skip
        backup_view = view["webhooks"]["sources"]["backup"]
        assert backup_view["received"] == 2 and backup_view["failed"] == 4  # two attempts each
        text = request(admin_port, "GET", "/metrics", headers=_bearer(ADMIN_TOKEN), host="127.0.0.1").body
        families = _families(text.decode())
        received = "apigate_webhooks_received"
        assert _sample(families, received, f"{received}_total", source="github", outcome="accepted") == 4
        assert _sample(families, received, f"{received}_total", source="github", outcome="duplicate") == 1
        dead = "apigate_webhook_dead_letters"
        assert _sample(families, dead, dead, source="backup", destination="vault") == 2
        assert _sample(families, dead, dead, source="github", destination="ledger") == 0  # a series at 0
        backlog = "apigate_webhook_backlog"
        assert _sample(families, backlog, backlog, source="github", destination="ledger") == 0
        deliveries = "apigate_webhook_deliveries"
        labels = {"source": "github", "destination": "ledger", "outcome": "delivered"}
        assert _sample(families, deliveries, f"{deliveries}_total", **labels) == 4
        stats = orjson.loads(request(process.port, "GET", "/stats").body)
        assert stats["webhooks_received"] == 7
    finally:
        process.stop()
        handler.stop()
        refusing.close()
