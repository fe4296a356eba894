"""A gateway with traffic of every kind, for the tests of what observes it (the dashboard, /metrics).

Routes that answer 200 (``orders``), 429 (``limited``: one request a minute), 401 and 200
(``keyed``: key-auth, consumer ``acme``), and 404 (no route); an upstream with a circuit breaker
and active health checks; GitHub webhooks for a handler that always answers 503, so that an event
ends as a dead letter, and for one that refuses connections and is tried again only after an hour,
so that it waits in the backlog. Tests add their own routes and upstreams to ``config``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.errors_helpers import ClosedPort, request, wait_until
from tests.support.gateway import GatewayProcess, free_port
from tests.support.upstream import UpstreamServer
from tests.support.webhook_handler import WebhookHandler
from tests.support.webhook_sender import Sender, github_source

TOKEN = "observed-admin-token-0123456789"
KEY = "observed-consumer-key-0123456789"
FAST_RETRIES = {"schedule": [0, "100ms"], "jitter": 0}


@dataclass
class Observed:
    gateway: GatewayProcess
    admin_port: int
    upstream: UpstreamServer

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}/"

    def admin_get(self, path: str) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        response = request(self.admin_port, "GET", path, headers=headers, host="127.0.0.1")
        return response.status, response.body


def observed_config(
    tmp_path: Path, admin_port: int, upstream: UpstreamServer, handler: WebhookHandler, later: ClosedPort
) -> dict:
    echo: dict[str, Any] = {"upstream": "backend", "rewrite": "/echo"}
    return {
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": TOKEN},
        "store": {"url": f"sqlite:///{tmp_path / 'store.db'}"},
        "consumers": [{"id": "acme", "keys": [{"key": KEY}]}],
        "upstreams": {
            "backend": {
                "targets": [upstream.url],
                "circuit_breaker": {"failures": 5, "recovery": "30s"},
                "health": {"active": {"path": "/status/200", "interval": "500ms"}},
            }
        },
        "routes": [
            {"name": "orders", "path": "/orders/*", **echo},
            {
                "name": "limited",
                "path": "/limited",
                **echo,
                "policies": {"rate-limit": {"limits": [{"rate": "1/min"}]}},
            },
            {"name": "keyed", "path": "/keyed", **echo, "policies": {"key-auth": {}}},
        ],
        "webhooks": {
            "poll_interval": "50ms",
            "sources": {"github": github_source(["handler", "later"])},
            "destinations": {
                "handler": {"url": handler.url, "timeout": "2s", "retry": FAST_RETRIES},
                "later": {"url": later.url, "timeout": "2s", "retry": {"schedule": [0, "1h"], "jitter": 0}},
            },
        },
    }


@contextmanager
def observed_gateway(tmp_path: Path, extend: Callable[[dict], None] | None = None) -> Iterator[Observed]:
    """The gateway, once its admin listener answers /api/metrics; ``extend(config)`` may add to it."""
    upstream = UpstreamServer().start()
    handler = WebhookHandler()
    handler.status = 503
    handler.start()
    admin_port = free_port()
    later = ClosedPort()
    config = observed_config(tmp_path, admin_port, upstream, handler, later)
    if extend is not None:
        extend(config)
    gateway = GatewayProcess(tmp_path, config).start()
    try:
        observed = Observed(gateway, admin_port, upstream)
        wait_until(lambda: observed.admin_get("/api/metrics")[0] == 200, timeout=15, message="/api/metrics")
        yield observed
    finally:
        gateway.stop()
        handler.stop()
        later.close()
        upstream.stop()


def send_mixed_traffic(port: int) -> None:
    """20 GETs and a POST with a body to ``orders``, a 404, a 200 and a 429 from ``limited``, a 401
    and a 200 from ``keyed``, and a webhook event."""
    for i in range(20):
        assert request(port, "GET", f"/orders/{i}").status == 200
    assert request(port, "POST", "/orders/new", body=b"x" * 100).status == 200
    assert request(port, "GET", "/nowhere").status == 404
    assert [request(port, "GET", "/limited").status for _ in range(2)] == [200, 429]
    assert request(port, "GET", "/keyed").status == 401
    assert request(port, "GET", "/keyed", headers={"X-API-Key": KEY}).status == 200
    sender = Sender(port, "/webhooks/github")
    try:
        assert sender.send("observed-event")[0] == 200
    finally:
        sender.close()
