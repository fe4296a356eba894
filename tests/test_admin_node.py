"""The admin listener and the node agent, with real gateways of one and of two workers.

The admin API answers for every worker (circuits opened in either show, a reset reaches both),
refuses a missing or wrong token, and the active checks run once per node, not once per worker.
"""

from __future__ import annotations

import collections
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.errors_helpers import Client, request, wait_until
from tests.support.faulty_upstream import FaultyUpstream
from tests.support.gateway import GatewayProcess, free_port
from tests.support.redis import RedisServer

TOKEN = "admin-token-for-tests"


def admin(port: int, method: str, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = [("Authorization", f"Bearer {token}")] if token is not None else []
    response = request(port, method, path, headers=headers, host="127.0.0.1")
    return response.status, orjson.loads(response.body) if response.body else None


@pytest.fixture
def targets() -> Iterator[list[FaultyUpstream]]:
    servers = [FaultyUpstream(f"t{i}").start() for i in range(3)]
    yield servers
    for server in servers:
        server.close()


def start(
    tmp_path: Path, targets: list[FaultyUpstream], workers: int, **upstream: Any
) -> tuple[GatewayProcess, int]:
    admin_port = free_port()
    config = {
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": TOKEN},
        "upstreams": {"pool": {"targets": [t.url for t in targets], **upstream}},
        "routes": [{"path": "/*", "upstream": "pool", "retries": 0}],
    }
    gateway = GatewayProcess(tmp_path, config, workers=workers).start()
    wait_until(lambda: _answers(admin_port, workers), timeout=15, message="every worker linked to the node")
    return gateway, admin_port


def _answers(port: int, workers: int = 1) -> bool:
    try:
        status, body = admin(port, "GET", "/api/services")
    except OSError:
        return False
    return status == 200 and body["workers"] == workers


def spread_requests(port: int, count: int) -> collections.Counter[int]:
    """``count`` requests, each on a new connection, so that both workers take some."""
    return collections.Counter(request(port, "GET", "/x").status for _ in range(count))


@pytest.mark.parametrize("workers", [1, 2])
def test_admin_refuses_a_missing_or_wrong_token(
    tmp_path: Path, targets: list[FaultyUpstream], workers: int
) -> None:
    gateway, port = start(tmp_path, targets, workers)
    try:
        status, body = admin(port, "GET", "/api/services", token=None)
        assert status == 401 and body == {"error": "a bearer token is required"}
        assert admin(port, "GET", "/api/circuits", token="wrong")[0] == 403
        assert admin(port, "POST", "/api/circuits/pool/reset", token="wrong")[0] == 403
        status, body = admin(port, "GET", "/api/services")
        assert status == 200 and body["workers"] == workers
        (pool,) = body["upstreams"]
        assert pool["name"] == "pool" and pool["balancer"] == "round_robin"
        assert [t["address"] for t in pool["targets"]] == [t.url for t in targets]
    finally:
        gateway.stop()


def test_circuits_of_every_worker_show_and_a_reset_reaches_them_all(
    tmp_path: Path, targets: list[FaultyUpstream]
) -> None:
    gateway, port = start(tmp_path, targets, 2, circuit_breaker={"failures": 2, "recovery": "60s"})
    try:
        bad = targets[0]
        bad.mode = "status:503"

        def both_open() -> bool:
            spread_requests(gateway.port, 6)
            circuit = _target(admin(port, "GET", "/api/services")[1], bad.url).get("circuit", {})
            return [w["state"] for w in circuit.get("workers", [])] == ["open", "open"]

        wait_until(both_open, timeout=15, message="the bad target's circuit open in both workers")
        status, body = admin(port, "GET", "/api/circuits")
        assert status == 200
        opened = [c for c in body["circuits"] if c["state"] == "open"]
        assert [c["target"] for c in opened] == [bad.url]
        # Opened by two failures in one worker, and in the other by that worker's hint (or its own).
        reasons = {w["reason"] for w in opened[0]["workers"]}
        assert opened[0]["failures"] >= 2 and "2 consecutive failures" in reasons
        assert reasons <= {"2 consecutive failures"} | {r for r in reasons if r.startswith("open at worker ")}
        hits = bad.hits
        assert spread_requests(gateway.port, 10) == {200: 10}  # no worker sends it anything
        assert bad.hits == hits

        bad.mode = "ok"
        status, body = admin(port, "POST", f"/api/circuits/pool/reset?target={bad.url}")
        assert status == 200 and body == {"workers": 2, "reset": 2}
        circuit = _target(admin(port, "GET", "/api/services")[1], bad.url)["circuit"]
        assert [w["state"] for w in circuit["workers"]] == ["closed", "closed"]
        wait_until(lambda: spread_requests(gateway.port, 6) and bad.hits > hits, timeout=10)
        assert admin(port, "POST", "/api/circuits/nowhere/reset")[0] == 404
        assert admin(port, "POST", "/api/circuits/pool/reset?target=http://10.9.9.9:1")[0] == 404
    finally:
        gateway.stop()


def _target(services: dict[str, Any], url: str) -> dict[str, Any]:
    (pool,) = services["upstreams"]
    return next(t for t in pool["targets"] if t["address"] == url)


def test_active_checks_run_once_per_node_and_every_worker_follows(
    tmp_path: Path, targets: list[FaultyUpstream]
) -> None:
    active = {"path": "/health", "interval": "200ms", "unhealthy_threshold": 2, "healthy_threshold": 1}
    gateway, port = start(tmp_path, targets, 2, health={"active": active})
    try:
        bad = targets[1]
        started = time.monotonic()
        before = bad.paths.count("/health")
        time.sleep(2.0)
        probes = bad.paths.count("/health") - before
        elapsed = time.monotonic() - started
        assert probes <= elapsed / 0.2 + 2, probes  # one checker: about one probe per interval
        assert probes >= 5, probes

        bad.stop()  # refuses: two failed probes take it out of every worker
        wait_until(
            lambda: not _target(admin(port, "GET", "/api/services")[1], bad.url)["healthy"], timeout=10
        )
        counts = collections.Counter(
            orjson.loads(Client(gateway.port).request("GET", "/y").body)["target"] for _ in range(20)
        )
        assert set(counts) == {"t0", "t2"}
        status, body = admin(port, "GET", "/api/health")
        assert status == 200 and body["status"] == "degraded"
        assert body["services"]["pool"]["healthy_targets"] == 2

        bad.start()
        wait_until(lambda: _target(admin(port, "GET", "/api/services")[1], bad.url)["healthy"], timeout=10)
        wait_until(
            lambda: (
                "t1" in {orjson.loads(request(gateway.port, "GET", "/z").body)["target"] for _ in range(6)}
            )
        )
    finally:
        gateway.stop()


def test_without_a_token_the_admin_listener_binds_loopback_only(tmp_path: Path) -> None:
    admin_port = free_port()
    config = {
        "admin": {"listen": f"0.0.0.0:{admin_port}"},
        "routes": [{"path": "/*", "target": "http://127.0.0.1:9"}],
    }
    gateway = GatewayProcess(tmp_path, config, env={"APIGATE_ADMIN_TOKEN": ""}).start()
    try:
        wait_until(lambda: _answers(admin_port), timeout=10)
        output = gateway.output()
        assert "listens on 127.0.0.1 only, not on 0.0.0.0" in output
        assert f"apigate admin API on http://127.0.0.1:{admin_port} (no token: loopback only)" in output
    finally:
        gateway.stop()


def test_health_detailed_shows_upstreams_circuits_state_and_readiness(
    tmp_path: Path, targets: list[FaultyUpstream]
) -> None:
    redis_server = RedisServer(tmp_path / "redis").start()
    config = {
        "admin": None,
        "timeouts": {"drain_notice": "3s"},
        "state": {"url": redis_server.url},
        "upstreams": {
            "pool": {
                "targets": [t.url for t in targets],
                "circuit_breaker": {"failures": 1, "recovery": "60s"},
            }
        },
        "routes": [
            {"path": "/*", "upstream": "pool", "retries": 0},
            {
                "path": "/limited",
                "target": targets[0].url,
                "policies": {"rate-limit": {"limits": [{"rate": "1000/s"}]}},
            },
        ],
    }
    (tmp_path / "gw").mkdir()
    gateway = GatewayProcess(tmp_path / "gw", config).start()
    try:
        targets[2].mode = "status:500"
        assert request(gateway.port, "GET", "/x").status == 200
        assert request(gateway.port, "GET", "/x").status == 200
        assert request(gateway.port, "GET", "/x").status == 500  # the third target opens its circuit

        def detailed() -> tuple[int, Any]:
            response = request(gateway.port, "GET", "/health/detailed", host="127.0.0.1")
            return response.status, orjson.loads(response.body)

        wait_until(lambda: detailed()[1]["dependencies"].get("state", {}).get("status") == "ok", timeout=10)
        status, body = detailed()
        assert status == 200 and body["ready"] is True and body["status"] == "degraded"
        pool = body["upstreams"]["pool"]
        assert pool["status"] == "degraded"
        assert [t["circuit"] for t in pool["targets"]] == ["closed", "closed", "open"]
        assert body["upstreams"]["/limited"]["status"] == "healthy"

        redis_server.stop()
        wait_until(lambda: detailed()[1]["dependencies"]["state"]["status"] == "unreachable", timeout=10)

        # SIGTERM: during the drain notice the gateway still serves, and says it is not ready.
        gateway.signal(signal.SIGTERM)
        wait_until(lambda: detailed()[0] == 503, timeout=5)
        status, body = detailed()
        assert body["ready"] is False and body["status"] == "draining"
        assert request(gateway.port, "GET", "/x").status in (200, 500)  # still served
    finally:
        gateway.stop()
        redis_server.stop()


def test_an_open_circuit_is_a_hint_to_the_other_workers_and_nodes(
    tmp_path: Path, targets: list[FaultyUpstream], redis_url: str
) -> None:
    """Gateway A (one worker) sees the target fail and opens its circuit; gateway B (two workers,
    another node on the same Redis) opens its own for that target without sending it anything."""
    upstream = {"targets": [targets[0].url], "circuit_breaker": {"failures": 2, "recovery": "30s"}}
    config = {
        "admin": None,
        "state": {"url": redis_url},
        "upstreams": {"pool": upstream},
        "routes": [{"path": "/*", "upstream": "pool", "retries": 0}],
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    node_b = GatewayProcess(tmp_path / "b", config, workers=2).start()
    node_a = GatewayProcess(tmp_path / "a", config).start()
    try:

        def circuits_of_b() -> list[str]:
            states = []
            for _ in range(6):  # new connections: both workers of B answer some
                body = orjson.loads(request(node_b.port, "GET", "/health/detailed", host="127.0.0.1").body)
                states.append(body["upstreams"]["pool"]["targets"][0].get("circuit"))
            return states

        assert set(circuits_of_b()) == {"closed"}
        targets[0].mode = "status:503"
        hits = targets[0].hits

        def a_opened() -> bool:
            request(node_a.port, "GET", "/x")
            return "circuit pool/" in node_a.output() and "open (2 consecutive failures)" in node_a.output()

        wait_until(a_opened, timeout=10, message="A's circuit opened")
        sent_by_a = targets[0].hits - hits
        wait_until(lambda: set(circuits_of_b()) == {"open"}, timeout=10, message="B's workers open too")
        assert targets[0].hits - hits == sent_by_a  # B sent nothing to learn it
        assert "open (open at node " in node_b.output()
        response = request(node_b.port, "GET", "/x")
        assert response.status == 503 and orjson.loads(response.body)["reason"] == "circuit_open"
    finally:
        node_a.stop()
        node_b.stop()
