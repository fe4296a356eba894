"""The `quota` policy: calendar periods in a time zone (DST days included), exact counts on Redis
and Redis Cluster, memory-backed counts that survive restarts and SIGKILL through the store, the
store role on SQLite and PostgreSQL, `apigate check` and `apigate limits`."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
import redis as redis_client
import yaml

from apigate.config.compile import route_policies
from apigate.config.loader import load_config
from apigate.policies.limits.algorithms import MemoryCounters
from apigate.policies.limits.calendar import CalendarQuota, period_at
from apigate.policies.quota.ledger import QuotaLedger
from apigate.store import open_store
from apigate.store.roles.quotas import QuotaUsage
from tests.support.errors_helpers import apigate_cmd, wait_until
from tests.support.gateway import GatewayProcess, free_port
from tests.support.limits import frozen, frozen_at, get_as, limits_cli
from tests.support.load import hammer
from tests.support.pg import fresh_database
from tests.support.upstream import UpstreamServer

WARSAW = ZoneInfo("Europe/Warsaw")


def at(iso: str) -> float:
    """Seconds since the epoch of an ISO 8601 time with its offset."""
    return datetime.fromisoformat(iso).timestamp()


def ms(iso: str) -> int:
    return round(at(iso) * 1000)


# -- calendar periods ------------------------------------------------------------------------------
WAW = "Europe/Warsaw"


@pytest.mark.parametrize(
    ("zone", "row"),
    [
        # kind, an instant, the start and end of its period, the period's id (an hour's: its start).
        # Warsaw's DST days: 23 hours when the clocks go forward, 25 when they go back.
        (WAW, "day 2026-03-29T12:00+02:00 2026-03-29T00:00+01:00 2026-03-30T00:00+02:00 2026-03-29"),
        (WAW, "day 2026-10-25T12:00+01:00 2026-10-25T00:00+02:00 2026-10-26T00:00+01:00 2026-10-25"),
        (WAW, "day 2026-03-29T23:59:59+02:00 2026-03-29T00:00+01:00 2026-03-30T00:00+02:00 2026-03-29"),
        (WAW, "day 2026-03-30T00:00+02:00 2026-03-30T00:00+02:00 2026-03-31T00:00+02:00 2026-03-30"),
        # Months: March holds the change to summer time (743 hours), a year ends.
        (WAW, "month 2026-03-31T23:59:59+02:00 2026-03-01T00:00+01:00 2026-04-01T00:00+02:00 2026-03"),
        (WAW, "month 2026-04-01T00:00+02:00 2026-04-01T00:00+02:00 2026-05-01T00:00+02:00 2026-04"),
        (WAW, "month 2026-12-31T23:59:59+01:00 2026-12-01T00:00+01:00 2027-01-01T00:00+01:00 2026-12"),
        # ISO weeks from Monday; 2026 has a week 53.
        (WAW, "week 2026-03-29T12:00+02:00 2026-03-23T00:00+01:00 2026-03-30T00:00+02:00 2026-W13"),
        (WAW, "week 2027-01-01T12:00+01:00 2026-12-28T00:00+01:00 2027-01-04T00:00+01:00 2026-W53"),
        # 02:00-03:00 happens twice when the clocks go back: two hours, each an hour long.
        (WAW, "hour 2026-10-25T02:30+02:00 2026-10-25T02:00+02:00 2026-10-25T03:00+02:00"),
        (WAW, "hour 2026-10-25T02:30+01:00 2026-10-25T02:00+01:00 2026-10-25T03:00+01:00"),
        (WAW, "hour 2026-03-29T03:15+02:00 2026-03-29T03:00+02:00 2026-03-29T04:00+02:00"),
        # Chile moves its clocks at midnight: 2026-09-06 begins at 01:00.
        (
            "America/Santiago",
            "day 2026-09-06T12:00-03:00 2026-09-06T01:00-03:00 2026-09-07T00:00-03:00 2026-09-06",
        ),
        ("Asia/Kolkata", "hour 2026-05-01T10:45+05:30 2026-05-01T10:00+05:30 2026-05-01T11:00+05:30"),
        ("UTC", "day 2026-03-29T12:00+00:00 2026-03-29T00:00+00:00 2026-03-30T00:00+00:00 2026-03-29"),
    ],
)
def test_periods_follow_the_calendar_of_the_zone(zone: str, row: str) -> None:
    kind, instant, start, end, *ident = row.split()
    assert period_at(kind, ZoneInfo(zone), ms(instant)) == (ms(start), ms(end), ident[0] if ident else start)


def test_a_quota_rolls_over_at_local_midnight_on_a_dst_day() -> None:
    counters = MemoryCounters(CalendarQuota(2, "day", WARSAW))
    algorithm = counters.algorithm
    last = ms("2026-03-29T23:59:59.999+02:00")
    assert [counters.take("k", last, 1) for _ in range(3)] == [True, True, False]
    assert (algorithm.remaining, algorithm.retry_ms, algorithm.reset_ms) == (0, 1, 1)
    # The first millisecond of the next local day counts afresh; 23 h after the day began.
    midnight = ms("2026-03-30T00:00+02:00")
    assert midnight - ms("2026-03-29T00:00+01:00") == 23 * 3600 * 1000
    assert counters.take("k", midnight, 1) is True
    assert (algorithm.remaining, algorithm.reset_ms) == (1, 24 * 3600 * 1000)


def test_a_quota_needs_the_store_write_behind_and_the_state_only_when_it_counts_there() -> None:
    config = load_config(
        text="routes:\n"
        "  - {path: /a, target: http://127.0.0.1:9, policies: {quota: {limits: [{quota: 5/day}]}}}\n"
        "  - {path: /b, target: http://127.0.0.1:9,\n"
        "     policies: {quota: {limits: [{quota: 5/day}], backend: memory}}}\n",
        environ={},
    )
    chains = route_policies(config)
    assert [chain[0].needs for chain in chains.values()] == [{"state", "quotas"}, {"quotas"}]
    assert chains["/b"][0].describe()["counters"] == "this process, written behind to the store"


# -- end to end on a frozen clock ------------------------------------------------------------------
def quota_route(upstream: UpstreamServer, policy: dict[str, Any], name: str = "api") -> dict[str, Any]:
    return {"name": name, "path": "/api/*", "target": upstream.url, "policies": {"quota": policy}}


def memory_config(store_url: str, *routes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return frozen(
        {"trusted_proxies": ["127.0.0.1/32"], "store": {"url": store_url}, "routes": list(routes), **extra}
    )


def stored_used(store_url: str, now: float) -> dict[tuple[str, str], int]:
    """What the store holds of the live quota counters, by (quota, key)."""

    async def read() -> dict[tuple[str, str], int]:
        store = open_store(store_url)
        await store.open()
        try:
            return {(u.quota, u.key): u.used for u in await store.list_quota_usage(now=now)}
        finally:
            await store.close()

    return asyncio.run(read())


def statuses(port: int, ip: str, times: int) -> list[int]:
    return [get_as(port, "/api/x", ip).status for _ in range(times)]


@pytest.mark.parametrize(
    ("now", "seconds_left"),
    [("2026-03-29T00:30+01:00", 22 * 3600 + 1800), ("2026-10-25T00:30+02:00", 24 * 3600 + 1800)],
)
def test_a_dst_day_ends_at_local_midnight(
    now: str,
    seconds_left: int,
    start_gateway: Callable[..., GatewayProcess],
    upstream: UpstreamServer,
    tmp_path: Path,
) -> None:
    policy = {"timezone": "Europe/Warsaw", "limits": [{"quota": "2/day"}]}
    config = memory_config(f"sqlite:///{tmp_path / 'quota.db'}", quota_route(upstream, policy))
    gateway = start_gateway(config, env=frozen_at(at(now)))
    first = get_as(gateway.port, "/api/x", "203.0.113.7")
    assert first.header("ratelimit-policy") == '"2-per-day";q=2;w=86400'
    assert first.header("ratelimit") == f'"2-per-day";r=1;t={seconds_left}'
    assert first.header("x-ratelimit-reset") == str(seconds_left)
    assert get_as(gateway.port, "/api/x", "203.0.113.7").status == 200
    refused = get_as(gateway.port, "/api/x", "203.0.113.7")
    assert refused.status == 429
    assert refused.header("retry-after") == str(seconds_left)
    assert refused.json() == {
        "error": "quota exceeded",
        "reason": "quota_exceeded",
        "request_id": refused.header("x-request-id"),
        "retry_after": seconds_left,
    }
    assert len(upstream.requests) == 2


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Config for counters in memory (written behind to SQLite) or on Redis."""
    store = {"store": {"url": f"sqlite:///{tmp_path / 'quota.db'}"}}
    if request.param == "memory":
        return store
    return {**store, "state": {"url": request.getfixturevalue("redis_url")}}


def test_quotas_roll_over_at_local_midnight_and_at_the_months_end(
    backend: dict[str, Any], start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    """One gateway after another on the same counters, each at a later time (Warsaw, CET)."""
    policy = {
        "timezone": "Europe/Warsaw",
        "limits": [{"name": "daily", "quota": "2/day"}, {"name": "monthly", "limit": 3, "period": "month"}],
    }
    config = frozen({"routes": [quota_route(upstream, policy)], **backend})

    def gateway_at(iso: str) -> GatewayProcess:
        return start_gateway(config, env=frozen_at(at(iso)))

    # 2 s before the local midnight: the day's 2, then the daily quota refuses until midnight.
    gateway = gateway_at("2026-10-30T23:59:58+01:00")
    assert [get_as(gateway.port, "/api/x", "192.0.2.1").status for _ in range(2)] == [200, 200]
    refused = get_as(gateway.port, "/api/x", "192.0.2.1")
    assert (refused.status, refused.header("retry-after")) == (429, "2")
    assert refused.header("ratelimit") == '"daily";r=0;t=2'
    gateway.stop()
    # Midnight: a new day, the same month (1 left of 3), which the next request spends.
    gateway = gateway_at("2026-10-31T00:00:00+01:00")
    admitted = get_as(gateway.port, "/api/x", "192.0.2.1")
    assert admitted.status == 200
    assert admitted.header("ratelimit") == '"monthly";r=0;t=86400'  # the tightest: the month's
    refused = get_as(gateway.port, "/api/x", "192.0.2.1")
    assert (refused.status, refused.header("ratelimit")) == (429, '"monthly";r=0;t=86400')
    assert refused.json()["retry_after"] == 86400
    gateway.stop()
    # The month's end: both afresh.
    gateway = gateway_at("2026-11-01T00:00:00+01:00")
    admitted = get_as(gateway.port, "/api/x", "192.0.2.1")
    assert admitted.status == 200
    assert admitted.header("ratelimit") == '"daily";r=1;t=86400'


def test_plans_pick_the_quota_and_cost_spends_several_units(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, tmp_path: Path
) -> None:
    policy = {
        "timezone": "Europe/Warsaw",
        "key": "header:x-team",
        "cost": 2,
        "tiers": {
            "by": "header:x-plan",
            "default": "free",
            "plans": {"free": [{"quota": "2/day"}], "pro": [{"name": "pro", "limit": 6, "period": "week"}]},
        },
    }
    config = memory_config(f"sqlite:///{tmp_path / 'quota.db'}", quota_route(upstream, policy))
    gateway = start_gateway(config, env=frozen_at(at("2026-03-29T12:00+02:00")))  # a Sunday

    def go(team: str, plan: str | None = None) -> tuple[int, str | None]:
        headers = [("X-Team", team), *([("X-Plan", plan)] if plan else [])]
        response = get_as(gateway.port, "/api/x", "192.0.2.1", headers)
        return response.status, response.header("ratelimit")

    assert [go("a"), go("a")] == [(200, '"2-per-day";r=0;t=43200'), (429, '"2-per-day";r=0;t=43200')]
    # The pro plan's week ends at Monday's midnight, 12 hours on; 6 units are 3 requests.
    assert go("b", "pro") == (200, '"pro";r=4;t=43200')
    assert [go("b", "pro")[0] for _ in range(3)] == [200, 200, 429]


@pytest.mark.parametrize(("on_error", "status"), [("allow", 200), ("deny", 503)])
def test_redis_unreachable_follows_on_redis_error(
    on_error: str, status: int, start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    policy = {"limits": [{"quota": "5/day"}], "on_redis_error": on_error}
    gateway = start_gateway({"state": {"url": nowhere}, "routes": [quota_route(upstream, policy)]})
    answers = [get_as(gateway.port, "/api/x", "192.0.2.1") for _ in range(2)]
    assert [answer.status for answer in answers] == [status] * 2
    if status == 503:
        assert answers[0].json()["error"] == "quotas cannot be checked now"
    wait_until(lambda: gateway.output().count("quota: Redis at") == 1)


# -- Redis: exact across processes; expiry at the period's end --------------------------------------
def test_exactly_the_quota_is_admitted_across_workers_and_gateways_on_redis(
    any_redis_url: str, start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    """2 workers and a second gateway, 300 requests at once on 60 connections: exactly 100 pass,
    on one Redis and on a 3-node Redis Cluster."""
    url = any_redis_url
    policy = {"timezone": "Europe/Warsaw", "limits": [{"quota": "100/day"}]}
    config = frozen({"state": {"url": url}, "routes": [quota_route(upstream, policy)]})
    env = frozen_at(at("2026-06-15T12:00+02:00"))
    first = start_gateway(config, workers=2, env=env)
    second = start_gateway(config, env=env)
    assert hammer([first.port, second.port], "/api/x", connections=60, per_connection=5) == {
        200: 100,
        429: 200,
    }
    assert len(upstream.requests) == 100


def test_a_redis_counter_expires_at_its_periods_end_and_outlives_a_restart(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, redis_url: str
) -> None:
    policy = {"timezone": "Europe/Warsaw", "limits": [{"quota": "5/day"}]}
    config = frozen(
        {
            "state": {"url": redis_url},
            "trusted_proxies": ["127.0.0.1/32"],
            "routes": [quota_route(upstream, policy)],
        }
    )
    env = frozen_at(at("2026-03-29T23:00+02:00"))  # an hour before the end of a 23-hour day
    gateway = start_gateway(config, env=env)
    assert statuses(gateway.port, "203.0.113.7", 3) == [200] * 3

    client = redis_client.Redis.from_url(redis_url)
    try:
        (name,) = client.keys("apigate:*")
        assert name.decode().endswith(":quota:2026-03-29") and "203.0.113.7" in name.decode()
        assert client.get(name) == b"3"
        # PEXPIRE from the gateway's clock: the hour left, and a minute's grace.
        assert 3_660_000 - 30_000 < client.pttl(name) <= 3_660_000
    finally:
        client.close()

    gateway.stop()
    gateway = start_gateway(config, env=env)
    assert statuses(gateway.port, "203.0.113.7", 3) == [200, 200, 429]


# -- memory: written behind to the store ------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'quota.db'}"
        return
    with fresh_database() as url:
        yield url


NOON = "2026-06-15T12:00+02:00"


def test_memory_counts_survive_a_graceful_restart(
    store_url: str, start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer
) -> None:
    policy = {
        "timezone": "Europe/Warsaw",
        "backend": "memory",
        "limits": [{"name": "daily", "quota": "5/day"}],
    }
    config = memory_config(store_url, quota_route(upstream, policy))
    gateway = start_gateway(config, env=frozen_at(at(NOON)))
    assert statuses(gateway.port, "203.0.113.7", 3) == [200] * 3
    gateway.stop()  # SIGTERM: the last counts are written before it exits
    assert stored_used(store_url, at(NOON)) == {("daily", "203.0.113.7"): 3}

    gateway = start_gateway(config, env=frozen_at(at(NOON)))
    first = get_as(gateway.port, "/api/x", "203.0.113.7")
    assert first.header("x-ratelimit-remaining") == "1"
    assert statuses(gateway.port, "203.0.113.7", 2) == [200, 429]


def test_sigkill_loses_at_most_what_was_admitted_since_the_last_write(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, tmp_path: Path
) -> None:
    """Written behind every second: once the store holds a count, a SIGKILL loses none of it;
    what it loses is what was admitted after the last write."""
    store_url = f"sqlite:///{tmp_path / 'quota.db'}"
    config = memory_config(
        store_url, quota_route(upstream, {"limits": [{"name": "daily", "quota": "100/day"}]})
    )
    env = frozen_at(at(NOON))
    ip = "203.0.113.7"

    def used() -> int:
        return stored_used(store_url, at(NOON)).get(("daily", ip), 0)

    def kill(gateway: GatewayProcess) -> None:
        assert gateway.proc is not None
        gateway.proc.send_signal(signal.SIGKILL)
        gateway.proc.wait(10)

    gateway = start_gateway(config, env=env)
    assert statuses(gateway.port, ip, 30) == [200] * 30
    wait_until(lambda: used() == 30, timeout=5, message="the 30 written to the store")
    kill(gateway)
    gateway.start()
    assert get_as(gateway.port, "/api/x", ip).header("x-ratelimit-remaining") == "69"  # 31 spent

    # 20 more and a SIGKILL at once: the store has what it had at its last write, no more.
    wait_until(lambda: used() == 31, timeout=5, message="the 31st written")
    assert statuses(gateway.port, ip, 20) == [200] * 20
    kill(gateway)
    kept = used()
    assert 31 <= kept <= 51
    gateway.start()
    assert get_as(gateway.port, "/api/x", ip).header("x-ratelimit-remaining") == str(100 - kept - 1)


def test_workers_share_a_memory_quota_through_the_store(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'quota.db'}"
    config = memory_config(
        store_url, quota_route(upstream, {"limits": [{"name": "daily", "quota": "20/day"}]})
    )
    gateway = start_gateway(config, workers=2, env=frozen_at(at(NOON)))
    assert statuses(gateway.port, "203.0.113.7", 20) == [200] * 20  # whichever worker takes each
    wait_until(lambda: stored_used(store_url, at(NOON)) == {("daily", "203.0.113.7"): 20})
    # Each worker reads what the other wrote: soon every connection, to either worker, is refused.
    wait_until(lambda: statuses(gateway.port, "203.0.113.7", 8) == [429] * 8)


def test_a_reload_keeps_the_counts_even_with_a_new_number(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'quota.db'}"
    policy = {"limits": [{"name": "daily", "quota": "5/day"}]}
    gateway = start_gateway(memory_config(store_url, quota_route(upstream, policy)), env=frozen_at(at(NOON)))
    assert statuses(gateway.port, "203.0.113.7", 3) == [200] * 3

    gateway.write_config(
        memory_config(store_url, quota_route(upstream, {"limits": [{"name": "daily", "quota": "6/day"}]}))
    )
    gateway.signal(signal.SIGHUP)
    wait_until(
        lambda: "q=6" in (get_as(gateway.port, "/api/x", "198.51.100.1").header("ratelimit-policy") or "")
    )
    assert get_as(gateway.port, "/api/x", "203.0.113.7").header("x-ratelimit-remaining") == "2"


# -- the store role --------------------------------------------------------------------------------
def test_quota_usage_role_adds_reads_changes_resets_and_expires(store_url: str) -> None:
    day, period = at("2026-03-30T00:00+02:00") + 60, "2026-03-29"

    def usage(key: str, used: int, expires_at: float = day, route: str = "api") -> QuotaUsage:
        return QuotaUsage(route, "daily", key, period, used, expires_at)

    async def scenario() -> None:
        one, other = open_store(store_url), open_store(store_url)
        await one.open()
        await other.open()
        try:
            now = at("2026-03-29T12:00+02:00")
            first, found = await one.sync_quota_usage([usage("a", 3), usage("b", 2)], 0, now)
            assert sorted(found, key=lambda u: u.key) == [usage("a", 3), usage("b", 2)]
            # Additions from any process add up; a reader gets what changed since its version.
            second, found = await other.sync_quota_usage([usage("a", 4)], first, now)
            assert second > first and found == [usage("a", 7)]
            assert await one.sync_quota_usage([], second, now) == (second, [])
            assert sorted((u.key, u.used) for u in (await one.sync_quota_usage([], 0, now))[1]) == [
                ("a", 7),
                ("b", 2),
            ]
            # Concurrent writers: every addition lands.
            await asyncio.gather(
                *(store.sync_quota_usage([usage("c", 1)], 0, now) for store in [one, other] * 10)
            )
            assert [u.used for u in await one.list_quota_usage("api", "c", now)] == [20]
            # A reset is a change that readers see.
            assert await other.reset_quota_usage("api", "daily", period, "a") == 1
            third, found = await one.sync_quota_usage([], second, now)
            assert third > second and usage("a", 0) in found
            assert await one.reset_quota_usage("api", "daily", period) == 3
            # Rows of periods that ended go when a writer passes their expiry.
            await one.sync_quota_usage([usage("z", 1, day + 86400, "other")], third, day + 1)
            assert await one.list_quota_usage(now=day + 1) == [usage("z", 1, day + 86400, "other")]
        finally:
            await one.close()
            await other.close()

    asyncio.run(scenario())


class FailingStore:
    """The quota role of a real store that can be made to fail, as a store that is down does."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.down = False

    async def sync_quota_usage(self, added: Any, since: int, now: float) -> Any:
        if self.down:
            raise OSError("the store is down")
        return await self.store.sync_quota_usage(added, since, now)


def test_the_ledger_writes_additions_reads_other_processes_and_keeps_what_it_could_not_write(
    tmp_path: Path, run: Callable[[Any], Any]
) -> None:
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    utc = ZoneInfo("UTC")

    async def scenario() -> None:
        store = open_store(url)
        await store.open()
        try:
            here, there = QuotaLedger(), QuotaLedger()  # two processes on one store
            failing = FailingStore(store)
            await here.start(lambda: asyncio.sleep(0, failing), state_shared=False)
            await there.start(lambda: asyncio.sleep(0, store), state_shared=False)
            mine = here.track("api", "daily", CalendarQuota(10, "day", utc), 1000, True)
            theirs = there.track("api", "daily", CalendarQuota(10, "day", utc), 1000, True)
            now = time.time_ns() // 1_000_000  # the clock the ledger reads

            assert [mine.take("k", now, 1) for _ in range(3)] == [True] * 3
            failing.down = True
            with pytest.raises(OSError):
                await here.sync()
            assert mine.take("k", now, 2)  # 5 here, none written yet
            failing.down = False
            await here.sync()  # the 3 it could not write, and the 2 since
            assert [(u.key, u.used) for u in await store.list_quota_usage("api")] == [("k", 5)]

            assert theirs.take("k", now, 4)
            await there.sync()
            await here.sync()  # reads the other's 4: 9 of 10
            assert [mine.take("k", now, 1) for _ in range(2)] == [True, False]
            await store.reset_quota_usage("api", "daily", datetime.now(utc).date().isoformat(), "k")
            await here.sync()  # the reset, and its 1 unwritten on top
            assert mine.algorithm.remaining == 0 and mine.take("k", now, 9) and not mine.take("k", now, 1)
            await here.stop()
            await there.stop()
        finally:
            await store.close()

    run(scenario())


# -- apigate check ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("policy", "field", "words"),
    [
        ({"timezone": "Europe/Atlantis", "limits": [{"quota": "10/day"}]}, "timezone", "unknown time zone"),
        ({"limits": [{"quota": "10/fortnight"}]}, "limits[0].quota", "1000/day"),
        ({"limits": [{"limit": 10, "period": "year"}]}, "limits[0].period", "hour"),
        ({"limits": [{"limit": 0, "period": "day"}]}, "limits[0].limit", "greater than or equal to 1"),
        ({"limits": [{"limit": 10**13, "period": "day"}]}, "limits[0].limit", "less than or equal"),
        ({"limits": [{"limit": 10}]}, "limits[0]", "`period`"),
        ({"limits": [{"quota": "10/day", "period": "day"}]}, "limits[0]", "goes with `limit`"),
        ({"limits": [{"quota": "10/day"}, {"quota": "10/day"}]}, "limits", "same name"),
        ({"limits": [{"quota": "10/day"}], "key": "cookie:x"}, "key", "unknown key"),
        ({"limits": [{"quota": "10/day"}], "cost": 0}, "cost", "greater than or equal to 1"),
        ({"limits": [{"quota": "10/day"}], "backend": "hybrid"}, "backend", "backend: state or memory"),
        ({"limits": [{"quota": "10/day"}], "state_url": "redis://r/0"}, "state_url", "count on state.url"),
        ({"tiers": {"plans": {"free": [{"quota": "1/day"}]}, "default": "gold"}}, "tiers", "names no plan"),
        ({"tiers": {"plans": {"free": [{"quota": "5/day", "window": 1}]}}}, "tiers.plans.free[0]", "window"),
        ({}, "", "give `limits`"),
    ],
)  # fmt: skip
def test_a_malformed_quota_is_refused_by_check_with_its_path_and_line(
    tmp_path: Path, policy: dict[str, Any], field: str, words: str
) -> None:
    path = tmp_path / "apigate.yaml"
    config = {"routes": [{"path": "/api/*", "target": "http://127.0.0.1:9", "policies": {"quota": policy}}]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run(apigate_cmd("check", "-c", str(path)), capture_output=True, text=True, timeout=60)
    output = done.stderr + done.stdout
    assert done.returncode != 0, output
    where = f"routes[0].policies.quota.{field}".rstrip(".")
    line = next(line for line in output.splitlines() if where in line)
    assert line.strip().startswith("line "), output
    assert words in output, output


# -- apigate limits show | reset ---------------------------------------------------------------------
def shown(gateway: GatewayProcess, env: dict[str, str], *args: str) -> dict[str, dict[str, Any]]:
    done = limits_cli(gateway, "show", "--json", *args, env=env)
    assert done.returncode == 0, done.stderr
    return {c["key"]: c for c in orjson.loads(done.stdout)}


def test_limits_show_and_reset_quota_counters_on_redis_and_in_the_store(
    backend: dict[str, Any],
    start_gateway: Callable[..., GatewayProcess],
    upstream: UpstreamServer,
    tmp_path: Path,
) -> None:
    policy = {"timezone": "Europe/Warsaw", "limits": [{"name": "daily", "quota": "3/day"}]}
    config = frozen(
        {"trusted_proxies": ["127.0.0.1/32"], "routes": [quota_route(upstream, policy)], **backend}
    )
    env = frozen_at(at(NOON))
    gateway = start_gateway(config, env=env)
    assert statuses(gateway.port, "203.0.113.7", 2) == [200, 200]
    assert statuses(gateway.port, "203.0.113.8", 4) == [200, 200, 200, 429]

    def counters() -> dict[str, dict[str, Any]]:
        return shown(gateway, env, "--route", "api")

    # In memory the counts reach the store within about a second; on Redis at once.
    wait_until(
        lambda: {k: c["remaining"] for k, c in counters().items()} == {"203.0.113.7": 1, "203.0.113.8": 0}
    )
    assert counters()["203.0.113.7"] == {
        "policy": "quota", "route": "api", "limit": "daily", "key": "203.0.113.7", "algorithm": "quota",
        "remaining": 1, "capacity": 3, "reset_seconds": 12 * 3600, "period": "2026-06-15",
    }  # fmt: skip
    text = limits_cli(gateway, "show", "--key", "203.0.113.8", env=env).stdout
    assert "203.0.113.8" in text and "2026-06-15" in text and "203.0.113.7" not in text

    done = limits_cli(gateway, "reset", "--key", "203.0.113.8", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == [
        {"route": "api", "policy": "quota", "limit": "daily", "key": "203.0.113.8"}
    ]
    # The gateway reads the reset (from Redis at once; from the store within about a second).
    wait_until(lambda: get_as(gateway.port, "/api/x", "203.0.113.8").status == 200)
    wait_until(lambda: counters()["203.0.113.8"]["remaining"] == 2)  # that request, written
    assert limits_cli(gateway, "reset", "--all", env=env).stdout.strip().startswith("reset ")
    assert all(c["remaining"] == 3 for c in counters().values())


def test_limits_reads_store_quotas_beside_per_process_rate_limits(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamServer, tmp_path: Path
) -> None:
    """state memory://: rate-limit counters cannot be read from outside, quotas can (the store)."""
    store_url = f"sqlite:///{tmp_path / 'quota.db'}"
    route = quota_route(upstream, {"limits": [{"name": "daily", "quota": "3/day"}]})
    route["rate_limit"] = "100/min"
    env = frozen_at(at(NOON))
    gateway = start_gateway(memory_config(store_url, route), env=env)
    assert get_as(gateway.port, "/api/x", "203.0.113.7").status == 200
    wait_until(lambda: set(shown(gateway, env)) == {"203.0.113.7"})
    assert [c["policy"] for c in shown(gateway, env).values()] == ["quota"]
