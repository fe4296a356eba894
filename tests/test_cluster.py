"""Two gateway processes on one PostgreSQL database: what the CLI changes reaches both in ~1 s.

Two ways: polling the store alone (``poll_interval`` 0.5 s), and change notices over one Redis
(polling set to 30 s, so only the notices can make it in time). And when Redis is lost while a
gateway relies on its notices, polling takes over at once.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.cli import apigate_json, seconds_until
from tests.support.errors_helpers import request
from tests.support.gateway import GatewayProcess
from tests.support.jwks_server import HS_SECRET, claims, hs_sign
from tests.support.pg import fresh_database
from tests.support.redis import RedisServer
from tests.support.upstream import UpstreamServer

# Polling: the target is 1 s (poll_interval 0.5 s); the margin is for a loaded machine.
# Redis notices: the acceptance's 1 s, with no margin needed (they arrive in milliseconds).
PROPAGATION_LIMIT = {"polling": 1.5, "redis": 1.0}


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@dataclass
class Fanout:
    """One way changes travel: what the gateways' config and the CLI get for it."""

    name: str
    store: dict[str, Any] = field(default_factory=dict)  # merged into store: (after url)
    state: dict[str, Any] | None = None
    cli_args: list[str] = field(default_factory=list)


@pytest.fixture(params=["polling", "redis"])
def fanout(request: pytest.FixtureRequest) -> Fanout:
    if request.param == "polling":
        return Fanout("polling")
    redis_url = request.getfixturevalue("redis_url")
    return Fanout("redis", {"poll_interval": "30s"}, {"url": redis_url}, ["--state", redis_url])


def test_two_gateways_on_one_postgres_see_cli_changes_within_a_second(
    pg_url: str,  # first: set up before the gateways, so dropped only after they stopped
    fanout: Fanout,
    start_gateway: Callable[..., GatewayProcess],
    upstream: UpstreamServer,
    tmp_path: Path,
) -> None:
    jwt = {"algorithms": ["HS256"], "secret": HS_SECRET, "check_revoked": True}
    config: dict[str, Any] = {
        "store": {"url": pg_url, **fanout.store},
        **({"state": fanout.state} if fanout.state else {}),
        "routes": [
            {"path": "/api/*", "target": upstream.url, "policies": {"key-auth": {}}},
            {"path": "/jwt/*", "target": upstream.url, "policies": {"jwt": jwt}},
        ],
    }
    gateways = [start_gateway(config), start_gateway(config)]

    def cli(*args: str) -> Any:
        return apigate_json(tmp_path, pg_url, *args, *fanout.cli_args)

    def statuses(path: str, header: tuple[str, str]) -> list[int]:
        return [request(g.port, "GET", path, [header]).status for g in gateways]

    def key_statuses(key: str) -> list[int]:
        return statuses("/api/echo", ("X-API-Key", key))

    assert key_statuses("ak_unknown") == [401, 401]
    took: dict[str, float] = {}

    cli("consumers", "create", "node-user", "--tenant", "n")
    made = cli("keys", "create", "node-user")
    took["key created"] = seconds_until(lambda: key_statuses(made["key"]) == [200, 200])
    for gateway in gateways:
        echo = request(gateway.port, "GET", "/api/echo", [("X-API-Key", made["key"])]).json()
        assert echo["headers"]["x-consumer-id"] == "node-user" and echo["headers"]["x-tenant-id"] == "n"

    cli("keys", "revoke", made["id"])
    took["key revoked"] = seconds_until(lambda: key_statuses(made["key"]) == [401, 401])

    token = hs_sign(claims(jti="cluster-token-1"))
    bearer = ("Authorization", f"Bearer {token}")
    assert statuses("/jwt/echo", bearer) == [200, 200]  # verified, and now cached by both
    cli("tokens", "revoke", "cluster-token-1", "--reason", "leaked")
    took["jti revoked"] = seconds_until(lambda: statuses("/jwt/echo", bearer) == [401, 401])

    print(f"propagation with {fanout.name}: " + ", ".join(f"{k} {s * 1000:.0f} ms" for k, s in took.items()))
    for what, seconds in took.items():
        assert seconds <= PROPAGATION_LIMIT[fanout.name], f"{what}: both agreed after {seconds:.2f}s"


# A live subscription slows the store polling to a 5 s safety net; once Redis is gone the default
# poll_interval (0.5 s) applies again. The margin is for the CLI's own start and a loaded machine.
REVOKED_AFTER_REDIS_LOST_LIMIT = 2.0


@pytest.mark.parametrize("outage", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_key_revoked_after_redis_is_lost_is_refused_within_the_poll_interval(
    outage: signal.Signals,
    start_gateway: Callable[..., GatewayProcess],
    upstream: UpstreamServer,
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis").start()  # this test's own: it kills or stops it
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    try:
        gateway = start_gateway(
            {
                "store": {"url": store_url},
                "state": {"url": server.url},
                "routes": [{"path": "/api/*", "target": upstream.url, "policies": {"key-auth": {}}}],
            }
        )
        with redis.Redis(port=server.port, socket_timeout=5) as client:
            seconds_until(lambda: client.pubsub_numsub("apigate:changes")[0][1] == 1)

        def key_status(key: str) -> int:
            return request(gateway.port, "GET", "/api/echo", [("X-API-Key", key)]).status

        # Created with a notice over Redis: the gateway reloads, then relies on notices.
        apigate_json(tmp_path, store_url, "consumers", "create", "alice", "--state", server.url)
        made = apigate_json(tmp_path, store_url, "keys", "create", "alice", "--state", server.url)
        seconds_until(lambda: key_status(made["key"]) == 200)

        assert server.proc is not None
        os.kill(server.proc.pid, outage)
        apigate_json(tmp_path, store_url, "keys", "revoke", made["id"])  # no Redis to announce it on
        took = seconds_until(lambda: key_status(made["key"]) == 401)
        print(f"revoked key refused {took * 1000:.0f} ms after the revocation, Redis {outage.name}")
        assert took < REVOKED_AFTER_REDIS_LOST_LIMIT, f"the revoked key kept working {took:.2f}s"
    finally:
        if server.proc is not None and outage == signal.SIGSTOP:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
