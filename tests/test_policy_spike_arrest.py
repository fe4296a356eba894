"""The `spike-arrest` policy: a per-minute allowance as a ceiling on every second, with time given
by the limits' injectable clock, and end to end in a gateway process."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from apigate.engine.replies import Reply
from apigate.policies.limits import clock
from apigate.policies.registry import build_policy
from tests.support.errors_helpers import request
from tests.support.exchanges import request_exchange
from tests.support.gateway import GatewayProcess
from tests.support.upstream import UpstreamServer

REPO = Path(__file__).resolve().parent.parent
PLUGIN_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
T0 = 1_800_000_000_000  # ms, on a second's edge


class Clock:
    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> int:
        return self.ms * 1_000_000


@pytest.fixture
def now() -> Iterator[Clock]:
    fake = Clock()
    before = clock.source()
    clock.use(fake)
    yield fake
    clock.use(before)


def admitted(policy, ip: str = "192.0.2.1") -> bool:
    result = policy.on_request(request_exchange([], peer=ip))
    assert result is None or isinstance(result, Reply)
    return result is None


def test_600_a_minute_is_at_most_10_in_any_second(now: Clock) -> None:
    policy = build_policy("spike-arrest", {"rate": "600/min"}, route=f"r-{T0}")
    assert [admitted(policy) for _ in range(12)] == [True] * 10 + [False] * 2
    refused = policy.on_request(request_exchange([], peer="192.0.2.1"))
    assert isinstance(refused, Reply) and refused.status == 429
    assert (b"retry-after", b"1") in refused.headers
    assert b'"reason":"spike_arrested"' in refused.body
    assert admitted(policy, "198.51.100.9")  # another client is counted apart
    now.ms += 999
    assert not admitted(policy)  # the ten stamps are still within the last second
    now.ms += 1
    assert [admitted(policy) for _ in range(11)] == [True] * 10 + [False]
    now.ms += 500  # a sliding second: the ten of T0+1000 still count
    assert not admitted(policy)


def test_below_one_a_second_allows_one_per_interval(now: Clock) -> None:
    policy = build_policy("spike-arrest", {"rate": "30/min"}, route=f"slow-{T0}")
    assert [admitted(policy) for _ in range(3)] == [True, False, False]
    now.ms += 1_999
    assert not admitted(policy)
    now.ms += 1
    assert admitted(policy)


@pytest.mark.parametrize("rate", ["600/parsec", "", "0/s"])
def test_a_malformed_rate_is_refused(rate: str) -> None:
    from apigate.policies.registry import validate_policy_config

    issues = validate_policy_config("spike-arrest", {"rate": rate}, ("policies", "spike-arrest"))
    assert issues and issues[0].loc == ("policies", "spike-arrest", "rate")


def test_spike_arrest_and_rate_limit_on_one_route(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    """The spike arrest refuses the 11th request of a second; the rate limit counts what passed."""
    gateway = start_gateway(
        {
            "plugins": ["tests.support.frozen_clock"],
            "routes": [
                {
                    "path": "/api/*",
                    "target": upstream.url,
                    "policies": {
                        "spike-arrest": {"rate": "600/min"},
                        "rate-limit": {"limits": [{"rate": "50/min"}]},
                    },
                }
            ],
        },
        env={**PLUGIN_ENV, "LIMITS_FROZEN_NOW": "1800000000.5"},
    )
    statuses = [request(gateway.port, "GET", "/api/x") for _ in range(11)]
    assert [r.status for r in statuses] == [200] * 10 + [429]
    assert statuses[-1].json()["reason"] == "spike_arrested"
    assert statuses[9].header("x-ratelimit-remaining") == "40"  # refused requests were not counted
    assert statuses[-1].header("ratelimit") is None  # spike-arrest sends no fields by default
