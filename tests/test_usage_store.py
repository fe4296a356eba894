"""The usage analytics role on both backends (SQLite on a temp file, PostgreSQL on a fresh database):
writes add up, queries group and bucket, rollups with a fixed clock keep every count exactly and
delete what the retention says, and rollups running at once (with each other, and with writers)
neither lose nor double-count a request."""

from __future__ import annotations

import asyncio
import random

from apigate.config.models import GatewayConfig
from apigate.config.usage import UsageConfig
from apigate.node.usage import NodeUsage
from apigate.observe.usage_queries import rollup_cutoffs
from apigate.store import Store, open_store
from apigate.store.roles.usage import DAY, HOUR, MINUTE, RollupCutoffs
from apigate.store.roles.usage import UsageBucket as Bucket
from apigate.store.roles.usage import UsageCounts as Counts
from apigate.store.roles.usage import UsageQuery as Query
from tests import test_store
from tests.support.state import Run

# Both backends, as the store suite runs them.
store_url = test_store.store_url
store = test_store.store

T0 = 1_775_000_000 - 1_775_000_000 % DAY  # a UTC midnight


def minute(
    start: int,
    requests: int,
    consumer: str | None = "alice",
    route: str | None = "orders",
    client_errors: int = 0,
    server_errors: int = 0,
    latency_max: float = 5.0,
) -> Bucket:
    counts = Counts(
        requests, client_errors, server_errors, 10 * requests, 100 * requests, 2.0 * requests, latency_max
    )
    return Bucket(MINUTE, start, route, consumer, f"key-{consumer}" if consumer else None, "acme", counts)


def totals(store: Store, run: Run, start: int = 0, end: int = 2**40, by: tuple[str, ...] = ()) -> dict:
    rows = run(store.query_usage(Query(start, end, by, None)))
    return {tuple(row.groups.values()): row.counts for row in rows}


def test_writes_add_to_their_bucket_and_keep_the_latency_maximum(store: Store, run: Run) -> None:
    run(store.add_usage([minute(T0, 3, latency_max=7.0), minute(T0 + 60, 1)]))
    run(store.add_usage([minute(T0, 2, client_errors=1, server_errors=1, latency_max=4.0)]))
    rows = run(store.query_usage(Query(T0, T0 + HOUR, ("consumer", "key", "tenant", "route"), MINUTE)))
    assert [(r.start, r.granularity, r.groups) for r in rows] == [
        (T0, MINUTE, {"consumer": "alice", "key": "key-alice", "tenant": "acme", "route": "orders"}),
        (T0 + 60, MINUTE, {"consumer": "alice", "key": "key-alice", "tenant": "acme", "route": "orders"}),
    ]
    first = rows[0].counts
    assert (first.requests, first.client_errors, first.server_errors) == (5, 1, 1)
    assert (first.bytes_in, first.bytes_out, first.latency_sum_ms, first.latency_max_ms) == (
        50,
        500,
        10.0,
        7.0,
    )


def test_missing_identities_read_back_as_none_and_group_apart(store: Store, run: Run) -> None:
    run(store.add_usage([minute(T0, 2, consumer=None, route=None), minute(T0, 3)]))
    found = totals(store, run, by=("consumer", "route"))
    assert found[(None, None)].requests == 2 and found[("alice", "orders")].requests == 3


def test_query_buckets_by_hour_day_and_total_within_the_range(store: Store, run: Run) -> None:
    run(store.add_usage([minute(T0 + m * 60, 1) for m in range(0, 180, 7)]))  # 26 minutes in 3 hours
    hours = run(store.query_usage(Query(T0, T0 + DAY, (), HOUR)))
    assert [(r.start, r.granularity, r.counts.requests) for r in hours] == [
        (T0, HOUR, 9),
        (T0 + HOUR, HOUR, 9),
        (T0 + 2 * HOUR, HOUR, 8),
    ]
    (total,) = run(store.query_usage(Query(T0 + HOUR, T0 + 2 * HOUR, (), None)))
    assert (total.start, total.granularity, total.counts.requests) == (T0 + HOUR, None, 9)
    assert run(store.query_usage(Query(T0 + DAY, T0 + 2 * DAY, (), None))) == []


def test_rollup_keeps_every_count_and_retention_deletes_old_days(store: Store, run: Run) -> None:
    usage = UsageConfig.model_validate(
        {"rollup": {"hourly_after": "2d", "daily_after": "30d"}, "retention": "60d"}
    )
    rng = random.Random(7)
    written = []
    for day in (0, 10, 40):
        for _ in range(50):
            at = T0 + day * DAY + rng.randrange(0, DAY // 60) * 60
            written.append(minute(at, rng.randrange(1, 5), consumer=rng.choice(["alice", "bob"])))
    run(store.add_usage(written))
    before = totals(store, run, by=("consumer",))
    # 45 days after: day 40 is 5 days old (to hours), day 10 is 35 (to days), day 0 is 45 (kept: < 60).
    now = T0 + 45 * DAY + 123
    result = run(store.rollup_usage(rollup_cutoffs(usage, now)))
    assert result.minutes_rolled == len({(b.start, b.consumer) for b in written}) and result.days_deleted == 0
    assert totals(store, run, by=("consumer",)) == before
    granularities = {r.granularity for r in run(store.query_usage(Query(T0, now, (), MINUTE)))}
    assert granularities == {HOUR, DAY}
    day40 = run(store.query_usage(Query(T0 + 40 * DAY, T0 + 41 * DAY, (), MINUTE)))
    assert {r.granularity for r in day40} == {HOUR}
    # A second rollup at the same time moves nothing and changes nothing.
    assert run(store.rollup_usage(rollup_cutoffs(usage, now))).minutes_rolled == 0
    assert totals(store, run, by=("consumer",)) == before
    # 65 days after: day 0 is past the retention and goes; the rest stays exact.
    kept = totals(store, run, start=T0 + DAY, by=("consumer",))
    result = run(store.rollup_usage(rollup_cutoffs(usage, T0 + 65 * DAY)))
    assert result.days_deleted > 0
    assert totals(store, run, by=("consumer",)) == kept


def test_a_late_minute_joins_its_rolled_up_hour_at_the_next_rollup(store: Store, run: Run) -> None:
    cutoffs = RollupCutoffs(hours_before=T0 + DAY, days_before=T0, delete_before=T0 - DAY)
    run(store.add_usage([minute(T0 + 60, 4)]))
    run(store.rollup_usage(cutoffs))
    run(store.add_usage([minute(T0 + 120, 3, latency_max=9.0)]))  # a flush that was retried late
    run(store.rollup_usage(cutoffs))
    (row,) = run(store.query_usage(Query(T0, T0 + DAY, (), MINUTE)))
    assert (row.start, row.granularity, row.counts.requests, row.counts.latency_max_ms) == (T0, HOUR, 7, 9.0)


def test_two_rollups_at_once_and_writers_meanwhile_count_each_request_once(store_url: str, run: Run) -> None:
    """Two store objects (two nodes) roll up the same rows at the same moment while two more keep
    writing minutes old enough to be rolled up: every request is counted exactly once."""
    cutoffs = RollupCutoffs(hours_before=T0 + 2 * DAY, days_before=T0 + DAY, delete_before=T0 - DAY)
    consumers = [f"c{n}" for n in range(20)]

    async def scenario() -> tuple[int, dict[str | None, int]]:
        stores = [open_store(store_url) for _ in range(4)]
        for one in stores:
            await one.open()
        try:
            await stores[0].add_usage(
                [minute(T0 + m * 60, 1, consumer=c) for m in range(0, 2 * 24 * 60, 13) for c in consumers]
            )
            written = 0

            async def write(one: Store, seed: int) -> int:
                rng = random.Random(seed)
                added = 0
                for _ in range(15):
                    batch = [
                        minute(T0 + rng.randrange(0, 2 * 24 * 60) * 60, 1, consumer=rng.choice(consumers))
                        for _ in range(40)
                    ]
                    await one.add_usage(batch)
                    added += len(batch)
                    await asyncio.sleep(0)
                return added

            async def roll(one: Store) -> None:
                for _ in range(5):
                    await one.rollup_usage(cutoffs)
                    await asyncio.sleep(0)

            counts = await asyncio.gather(
                roll(stores[0]), roll(stores[1]), write(stores[2], 1), write(stores[3], 2)
            )
            written = counts[2] + counts[3]
            await stores[0].rollup_usage(cutoffs)  # what the writers added after the last rollups
            rows = await stores[0].query_usage(Query(0, 2**40, ("consumer",), None))
            left = await stores[0].query_usage(Query(0, 2**40, (), MINUTE))
            assert all(r.granularity != MINUTE for r in left)
            return written, {r.groups["consumer"]: r.counts.requests for r in rows}
        finally:
            for one in stores:
                await one.close()

    written, found = run(scenario())
    initial = len(range(0, 2 * 24 * 60, 13)) * len(consumers)
    assert sum(found.values()) == initial + written


def test_the_node_rolls_up_by_its_clock_and_config(store_url: str, run: Run) -> None:
    config = GatewayConfig.model_validate(
        {"store": {"url": store_url}, "usage": {"rollup": {"hourly_after": "1h", "daily_after": "1d"}}}
    )
    now = [float(T0 + 30 * 60)]
    node = NodeUsage(config, clock=lambda: now[0])

    async def scenario() -> list[tuple[int, int | None, int]]:
        store = await node.store()
        await store.add_usage([minute(T0 - 90 * 60, 2), minute(T0 - 20 * 60, 3), minute(T0 + 60, 4)])
        await node.roll_up()  # an hour ago is T0 - 30 min: only the whole hour before T0 - 1h goes
        now[0] += 3 * HOUR
        await node.roll_up()
        rows = await store.query_usage(Query(0, 2**40, (), MINUTE))
        await node.stop()
        return [(r.start, r.granularity, r.counts.requests) for r in rows]

    assert run(scenario()) == [(T0 - 2 * HOUR, HOUR, 2), (T0 - HOUR, HOUR, 3), (T0, HOUR, 4)]
