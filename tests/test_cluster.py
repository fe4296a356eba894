"""Two gateway processes on one PostgreSQL database: what the CLI changes reaches both in ~1 s."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import apigate_json, seconds_until
from tests.support.errors_helpers import request
from tests.support.gateway import GatewayProcess
from tests.support.pg import fresh_database
from tests.support.upstream import UpstreamServer

PROPAGATION_LIMIT = 1.5  # the target is 1 s (poll_interval 0.5 s); the margin is for a loaded machine


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


def cli(cwd: Path, store: str, *args: str) -> Any:
    return apigate_json(cwd, store, *args)


def test_two_gateways_on_one_postgres_see_cli_changes_within_a_second(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, pg_url: str, tmp_path: Path
) -> None:
    config = {
        "store": {"url": pg_url},
        "routes": [{"path": "/api/*", "target": upstream.url, "policies": {"key-auth": {}}}],
    }
    gateways = [start_gateway(config), start_gateway(config)]

    def statuses(key: str) -> list[int]:
        return [request(g.port, "GET", "/api/echo", [("X-API-Key", key)]).status for g in gateways]

    assert statuses("ak_unknown") == [401, 401]

    cli(tmp_path, pg_url, "consumers", "create", "node-user", "--tenant", "n")
    made = cli(tmp_path, pg_url, "keys", "create", "node-user")
    took = seconds_until(lambda: statuses(made["key"]) == [200, 200])
    assert took <= PROPAGATION_LIMIT, f"new key accepted by both gateways after {took:.2f}s"
    for gateway in gateways:
        echo = request(gateway.port, "GET", "/api/echo", [("X-API-Key", made["key"])]).json()
        assert echo["headers"]["x-consumer-id"] == "node-user" and echo["headers"]["x-tenant-id"] == "n"

    cli(tmp_path, pg_url, "keys", "revoke", made["id"])
    took = seconds_until(lambda: statuses(made["key"]) == [401, 401])
    assert took <= PROPAGATION_LIMIT, f"revoked key refused by both gateways after {took:.2f}s"
