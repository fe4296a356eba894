"""The `rate-limit` policy end to end: real gateway processes, a real upstream, a real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
import redis as redis_client

from tests.support.errors_helpers import apigate_cmd, wait_until
from tests.support.errors_helpers import request as send
from tests.support.gateway import GatewayProcess
from tests.support.limits import frozen, frozen_at, get_as
from tests.support.limits import limits_cli as limits_cli_at
from tests.support.load import hammer
from tests.support.redis import RedisServer
from tests.support.redis_sentinel import RedisSentinelServers
from tests.support.upstream import UpstreamServer

FROZEN_NOW = 1_799_999_990.0  # 10 s before a minute's edge: no window rolls over during a test


def frozen_env() -> dict[str, str]:
    return frozen_at(FROZEN_NOW)


# -- the Pactown shorthand -------------------------------------------------------------------------
def test_shorthand_admits_100_a_minute_per_ip_and_refuses_the_101st(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    gateway = start_gateway(
        frozen(
            {
                "trusted_proxies": ["127.0.0.1/32"],
                "routes": [{"path": "/api/*", "target": upstream.url, "rate_limit": "100/min"}],
            }
        ),
        env=frozen_env(),
    )
    seen = [get_as(gateway.port, "/api/x", "203.0.113.7") for _ in range(100)]
    assert [r.status for r in seen] == [200] * 100
    first, last = seen[0], seen[-1]
    assert first.header("ratelimit-policy") == '"100-per-60s";q=100;w=60'
    # A sliding window forgets a request at the end of the next window: in 10 + 60 s.
    assert first.header("ratelimit") == '"100-per-60s";r=99;t=70'
    assert (first.header("x-ratelimit-limit"), first.header("x-ratelimit-remaining")) == ("100", "99")
    assert last.header("x-ratelimit-remaining") == "0"

    refused = get_as(gateway.port, "/api/x", "203.0.113.7")
    assert refused.status == 429
    # One more fits once the 100 weigh 99: 0.6 s into the next window (the weighted estimate).
    assert refused.header("retry-after") == "11"
    assert refused.header("ratelimit") == '"100-per-60s";r=0;t=70'
    assert refused.header("x-ratelimit-remaining") == "0"
    body = refused.json()
    assert body == {
        "error": "rate limit exceeded",
        "reason": "rate_limited",
        "request_id": refused.header("x-request-id"),
        "retry_after": 11,
    }
    # Another client is counted apart, and the upstream never saw the refused request.
    assert get_as(gateway.port, "/api/x", "198.51.100.1").status == 200
    assert len(upstream.requests) == 101

    routes = send(gateway.port, "GET", "/routes").json()["routes"]
    assert "inactive" not in routes[0]
    assert routes[0]["policies"]["rate-limit"]["counters"] == "this process"


@pytest.mark.parametrize("value", ["100/fortnight", "lots", "0/min", "100/0s"])
def test_an_unknown_shorthand_is_a_config_error_naming_the_field_and_line(tmp_path: Path, value: str) -> None:
    path = tmp_path / "apigate.yaml"
    path.write_text(f"routes:\n  - path: /api/*\n    target: http://127.0.0.1:9\n    rate_limit: {value}\n")
    done = subprocess.run(apigate_cmd("check", "-c", str(path)), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "routes[0].rate_limit" in done.stderr + done.stdout
    assert "line 4" in done.stderr + done.stdout
    assert "100/min" in done.stderr + done.stdout  # the message shows what is accepted


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"limits": [{"rate": "10/parsec"}]}, "limits[0].rate"),
        ({"limits": [{"limit": 10}]}, "limits[0]"),
        ({"limits": [{"rate": "10/s", "algorithm": "leaky_bucket"}]}, "limits"),
        ({"limits": [{"rate": "10/s", "burst": 5}]}, "limits"),
        ({"limits": [{"rate": "10/s"}], "key": ["ip", "cookie:session"]}, "key"),
        ({"limits": [{"rate": "10/s"}], "key": "header:bad header"}, "key"),
        ({"limits": [{"rate": "10/s"}], "headers": ["ietf", "github"]}, "headers[1]"),
        ({"tiers": {"by": "plan", "plans": {"free": [{"rate": "1/s"}]}}}, "tiers.by"),
        ({"tiers": {"plans": {"free": [{"rate": "1/s"}]}, "default": "gold"}}, "tiers"),
        ({"limits": [{"rate": "10/s"}], "state_url": "memory://"}, "state_url"),
        ({"limits": [{"rate": "10/s"}], "state_url": "mysql://db/x"}, "state_url"),
        ({"limits": [{"rate": "10/s"}], "backend": "memory", "state_url": "redis://r:6379/0"}, "state_url"),
        ({}, "rate-limit"),
    ],
)
def test_a_malformed_limit_is_refused_by_check_with_its_path(
    tmp_path: Path, policy: dict, field: str
) -> None:
    import yaml

    path = tmp_path / "apigate.yaml"
    config = {
        "routes": [{"path": "/api/*", "target": "http://127.0.0.1:9", "policies": {"rate-limit": policy}}]
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run(apigate_cmd("check", "-c", str(path)), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done.stdout
    assert f"routes[0].policies.rate-limit.{field}".rstrip(".") in done.stderr + done.stdout or (
        field == "rate-limit" and "routes[0].policies.rate-limit" in done.stderr + done.stdout
    )
    assert "line " in done.stderr + done.stdout


# -- keys, tiers, several limits -------------------------------------------------------------------
def test_keys_fall_back_when_a_part_is_missing_and_tiers_pick_the_plan(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    limit = {
        "key": ["header:x-team"],
        "fallback_key": ["ip"],
        "tiers": {
            "by": "header:x-plan",
            "plans": {"free": [{"rate": "2/min"}], "pro": [{"rate": "5/min"}]},
            "default": "free",
        },
    }
    gateway = start_gateway(
        frozen(
            {
                "trusted_proxies": ["127.0.0.1/32"],
                "routes": [{"path": "/api/*", "target": upstream.url, "policies": {"rate-limit": limit}}],
            }
        ),
        env=frozen_env(),
    )

    def statuses(ip: str, headers: list[tuple[str, str]], times: int) -> list[int]:
        return [get_as(gateway.port, "/api/x", ip, headers).status for _ in range(times)]

    # Team "a" on the pro plan: 5, wherever the requests come from.
    assert statuses("192.0.2.1", [("X-Team", "a"), ("X-Plan", "pro")], 3) == [200] * 3
    assert statuses("192.0.2.2", [("X-Team", "a"), ("X-Plan", "pro")], 3) == [200, 200, 429]
    # No plan: the default (free, 2); no team header: counted by IP instead, never a crash.
    assert statuses("192.0.2.3", [("X-Team", "b")], 3) == [200, 200, 429]
    assert statuses("192.0.2.4", [], 3) == [200, 200, 429]
    assert statuses("192.0.2.5", [], 1) == [200]


def test_a_limit_per_consumer_counts_a_key_from_any_address_and_a_token_by_its_subject(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, tmp_path: Path
) -> None:
    secret = "rate-limit-test-secret-0123456789abcdef"
    per_consumer = {"limits": [{"rate": "2/min"}], "key": "consumer"}
    gateway = start_gateway(
        frozen(
            {
                "trusted_proxies": ["127.0.0.1/32"],
                "store": {"url": f"sqlite:///{tmp_path / 'gateway.db'}"},
                "consumers": [
                    {"id": "alice", "keys": [{"key": "ak_alice0123456789abcdefghijklmnopq"}]},
                    {"id": "bob", "keys": [{"key": "ak_bob0123456789abcdefghijklmnopqrs"}]},
                ],
                "routes": [
                    {
                        "path": "/keyed/*",
                        "target": upstream.url,
                        "policies": {"key-auth": {}, "rate-limit": per_consumer},
                    },
                    {
                        "path": "/token/*",
                        "target": upstream.url,
                        "policies": {
                            "jwt": {"algorithms": ["HS256"], "secret": secret},
                            "rate-limit": per_consumer,
                        },
                    },
                ],
            }
        ),
        env=frozen_env(),
    )

    def status(path: str, ip: str, headers: list[tuple[str, str]]) -> int:
        return get_as(gateway.port, path, ip, headers).status

    alice = [("X-API-Key", "ak_alice0123456789abcdefghijklmnopq")]
    bob = [("X-API-Key", "ak_bob0123456789abcdefghijklmnopqrs")]
    addresses = ("192.0.2.1", "192.0.2.2", "192.0.2.3")
    assert [status("/keyed/x", ip, alice) for ip in addresses] == [200, 200, 429]
    assert [status("/keyed/x", "192.0.2.1", bob) for _ in range(3)] == [200, 200, 429]
    # A JWT names its consumer by its subject (a name, not a record): counted by that name.
    token = jwt.encode({"sub": "carol", "exp": int(time.time()) + 3600}, secret, algorithm="HS256")
    carol = [("Authorization", f"Bearer {token}")]
    others = ("192.0.2.4", "192.0.2.5", "192.0.2.6")
    assert [status("/token/x", ip, carol) for ip in others] == [200, 200, 429]


def test_the_first_limit_that_refuses_answers(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    limits = {
        "limits": [
            {"name": "burst", "rate": "3/s", "algorithm": "token_bucket"},
            {"name": "daily", "rate": "4/day", "algorithm": "fixed_window"},
        ],
        "headers": ["ietf", "x-ratelimit", "window", "token-bucket"],
    }
    gateway = start_gateway(
        frozen({"routes": [{"path": "/api/*", "target": upstream.url, "policies": {"rate-limit": limits}}]}),
        env=frozen_env(),
    )
    first = send(gateway.port, "GET", "/api/x")
    assert first.header("ratelimit-policy") == '"burst";q=3;w=1, "daily";q=4;w=86400'
    assert first.header("ratelimit") == '"burst";r=2;t=1'  # the tightest of the two
    assert first.header("x-ratelimit-window") == "1"
    assert first.header("x-tokenbucket-remaining") == "2"
    assert [send(gateway.port, "GET", "/api/x").status for _ in range(3)] == [200, 200, 429]
    refused = send(gateway.port, "GET", "/api/x")
    assert refused.header("ratelimit").startswith('"burst";r=0')


# -- exact across processes on Redis ---------------------------------------------------------------
ALGORITHM_LIMITS = {
    "sliding_window": {"limit": 100, "window": "60s"},
    "sliding_log": {"limit": 100, "window": "60s"},
    "fixed_window": {"limit": 100, "window": "60s"},
    "token_bucket": {"limit": 1, "window": "60s", "burst": 100},
    # 100 a second, waiting at most 0.99 s: the 100 that fit are admitted over about a second.
    "leaky_bucket": {"limit": 100, "window": "1s", "max_delay": "990ms"},
}


REDIS_URL_FIXTURES = {"redis": "redis_url", "cluster": "redis_cluster_url", "sentinel": "redis_sentinel_url"}


@pytest.mark.parametrize("redis", ["redis", "cluster", "sentinel"])
@pytest.mark.parametrize("algorithm", sorted(ALGORITHM_LIMITS))
def test_exactly_the_limit_is_admitted_across_workers_and_gateways_on_redis(
    algorithm: str,
    redis: str,
    start_gateway: Callable[..., GatewayProcess],
    upstream: UpstreamServer,
    request: pytest.FixtureRequest,
) -> None:
    """2 workers and a second gateway, 500 requests at once on 100 connections: exactly 100 pass,
    on one Redis, on a 3-node Redis Cluster, and on the master that Redis Sentinel names."""
    url = request.getfixturevalue(REDIS_URL_FIXTURES[redis])
    limit = {"algorithm": algorithm, **ALGORITHM_LIMITS[algorithm]}
    config = frozen(
        {
            "state": {"url": url},
            "routes": [
                {"path": "/api/*", "target": upstream.url, "policies": {"rate-limit": {"limits": [limit]}}}
            ],
        }
    )
    first = start_gateway(config, workers=2, env=frozen_env())
    second = start_gateway(config, env=frozen_env())
    statuses = hammer([first.port, second.port], "/api/x", connections=100, per_connection=5)
    assert statuses == {200: 100, 429: 400}
    assert len(upstream.requests) == 100


# -- Redis lost and back ---------------------------------------------------------------------------
@pytest.mark.parametrize("on_error", ["allow", "deny"])
def test_redis_lost_follows_on_redis_error_logs_once_and_recovers(
    on_error: str,
    start_gateway: Callable[..., GatewayProcess],
    upstream: UpstreamServer,
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        policy = {"limits": [{"rate": "3/min"}], "on_redis_error": on_error}
        gateway = start_gateway(
            frozen(
                {
                    "state": {"url": server.url},
                    "routes": [
                        {"path": "/api/*", "target": upstream.url, "policies": {"rate-limit": policy}}
                    ],
                }
            ),
            env=frozen_env(),
        )
        assert [send(gateway.port, "GET", "/api/x").status for _ in range(4)] == [200, 200, 200, 429]
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        during = [send(gateway.port, "GET", "/api/x").status for _ in range(5)]
        assert during == ([200] * 5 if on_error == "allow" else [503] * 5)
        assert gateway.output().count("rate-limit: Redis at") == 1  # one line for the whole outage

        server.start()  # empty again, on the same port: counting starts afresh
        wait_until(lambda: send(gateway.port, "GET", "/api/x").status == 200, timeout=10)
        assert [send(gateway.port, "GET", "/api/x").status for _ in range(3)] == [200, 200, 429]
        assert "Redis answers again" in gateway.output()
        assert gateway.proc is not None and gateway.proc.poll() is None
    finally:
        server.stop()


def test_limits_follow_the_master_through_a_sentinel_failover(
    start_gateway: Callable[..., GatewayProcess],
    upstream: UpstreamServer,
    redis_sentinel: RedisSentinelServers,
) -> None:
    """After a failover the old master is a read-only replica: the gateway drops its connection on
    the first READONLY answer and asks the sentinels for the new master, with no restart."""
    policy = {"limits": [{"rate": "3/min"}], "key": "header:x-client"}
    gateway = start_gateway(
        frozen(
            {
                "state": {"url": redis_sentinel.url},
                "routes": [{"path": "/api/*", "target": upstream.url, "policies": {"rate-limit": policy}}],
            }
        ),
        env=frozen_env(),
    )

    def limited(client: str) -> bool:
        """Three requests of ``client`` pass and the fourth is refused: decided on a writable master."""
        statuses = [send(gateway.port, "GET", "/api/x", [("X-Client", client)]).status for _ in range(4)]
        return statuses == [200, 200, 200, 429]

    assert limited("before")
    old_master = redis_sentinel.master_port()
    new_master = redis_sentinel.failover()
    assert new_master != old_master
    clients = (f"after-{n}" for n in range(1000))
    wait_until(lambda: limited(next(clients)), timeout=15)
    with redis_client.Redis(port=new_master) as client:
        assert any(b"after-" in key for key in client.keys("apigate:*"))  # counted on the new master
    assert gateway.proc is not None and gateway.proc.poll() is None


def test_workers_counting_apart_is_said_once_at_start(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    gateway = start_gateway(
        {"routes": [{"name": "api", "path": "/api/*", "target": upstream.url, "rate_limit": "10/s"}]},
        workers=2,
    )
    wait_until(lambda: "count in each of the 2 workers" in gateway.output())
    assert gateway.output().count("count in each of the 2 workers") == 1


# -- apigate limits show | reset -------------------------------------------------------------------
def limits_cli(gateway: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return limits_cli_at(gateway, *args, env=frozen_env())


@pytest.mark.parametrize("redis", ["redis", "cluster"])
def test_limits_show_and_reset_read_the_shared_counters(
    redis: str,
    start_gateway: Callable[..., GatewayProcess],
    upstream: UpstreamServer,
    request: pytest.FixtureRequest,
) -> None:
    import orjson

    url = request.getfixturevalue("redis_url" if redis == "redis" else "redis_cluster_url")
    limits = {
        "limits": [
            {"name": "minute", "rate": "5/min"},
            {"name": "burst", "rate": "3/min", "algorithm": "token_bucket"},
        ]
    }
    gateway = start_gateway(
        frozen(
            {
                "state": {"url": url},
                "trusted_proxies": ["127.0.0.1/32"],
                "routes": [
                    {
                        "name": "api",
                        "path": "/api/*",
                        "target": upstream.url,
                        "policies": {"rate-limit": limits},
                    },
                    {"name": "other", "path": "/other/*", "target": upstream.url, "rate_limit": "100/min"},
                ],
            }
        ),
        env=frozen_env(),
    )
    assert [get_as(gateway.port, "/api/x", "203.0.113.7").status for _ in range(4)] == [200, 200, 200, 429]
    assert get_as(gateway.port, "/api/x", "203.0.113.8").status == 200

    shown = limits_cli(gateway, "show", "--route", "api", "--json")
    assert shown.returncode == 0, shown.stderr
    counters = {(c["limit"], c["key"]): c for c in orjson.loads(shown.stdout)}
    assert set(counters) == {(n, ip) for n in ("minute", "burst") for ip in ("203.0.113.7", "203.0.113.8")}
    # The 4th request was counted by "minute" before "burst" refused it (limits count in order).
    assert counters["minute", "203.0.113.7"]["remaining"] == 1
    assert counters["burst", "203.0.113.7"]["remaining"] == 0
    assert counters["minute", "203.0.113.8"] | {"remaining": None} == {
        "policy": "rate-limit", "route": "api", "limit": "minute", "key": "203.0.113.8",
        "algorithm": "sliding_window", "remaining": None, "capacity": 5, "reset_seconds": 70,
    }  # fmt: skip
    text = limits_cli(gateway, "show", "--key", "203.0.113.7")
    assert "203.0.113.7" in text.stdout and "203.0.113.8" not in text.stdout

    done = limits_cli(gateway, "reset", "--route", "api", "--key", "203.0.113.7", "--json")
    assert done.returncode == 0, done.stderr
    assert len(orjson.loads(done.stdout)) == 2  # both limits of that key
    assert get_as(gateway.port, "/api/x", "203.0.113.7").status == 200  # a whole allowance again
    assert limits_cli(gateway, "reset", "--all").stdout.strip().startswith("reset ")
    assert orjson.loads(limits_cli(gateway, "show", "--json").stdout) == []


def test_a_policy_counts_on_a_redis_of_its_own(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, redis_url: str
) -> None:
    """``state_url`` on the policy: counters shared on that Redis while state.url stays memory://
    (two gateways share one count), and ``apigate limits`` finds them there."""
    import orjson

    policy = {"limits": [{"name": "minute", "rate": "5/min"}], "state_url": redis_url}
    route = {"name": "api", "path": "/api/*", "target": upstream.url, "policies": {"rate-limit": policy}}
    config = frozen({"trusted_proxies": ["127.0.0.1/32"], "routes": [route]})
    first = start_gateway(config, env=frozen_env())
    second = start_gateway(config, env=frozen_env())
    statuses = [get_as(port, "/api/x", "203.0.113.7").status for port in [first.port, second.port] * 4]
    assert statuses == [200] * 5 + [429] * 3
    routes = send(first.port, "GET", "/routes").json()["routes"]
    assert routes[0]["policies"]["rate-limit"]["counters"] == "shared (Redis)"
    with redis_client.Redis.from_url(redis_url) as client:
        assert any(b"203.0.113.7" in key for key in client.keys("apigate:*"))
    shown = limits_cli(first, "show", "--json")
    assert shown.returncode == 0, shown.stderr
    assert [(c["key"], c["remaining"]) for c in orjson.loads(shown.stdout)] == [("203.0.113.7", 0)]


def test_limits_cli_says_why_it_cannot_read_per_process_counters(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    gateway = start_gateway({"routes": [{"path": "/api/*", "target": upstream.url, "rate_limit": "5/min"}]})
    done = limits_cli(gateway, "show")
    assert done.returncode == 1
    assert "memory://" in done.stderr and "Traceback" not in done.stderr
    done = limits_cli(gateway, "reset", "--state", "redis://127.0.0.1:9/0")
    assert done.returncode == 1 and "--key KEY, or --all" in done.stderr
    done = limits_cli(gateway, "show", "--state", "redis://127.0.0.1:9/0", "--route", "nope")
    assert done.returncode == 1 and "no route named 'nope'" in done.stderr
