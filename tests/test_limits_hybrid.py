"""Hybrid counters (`backend: hybrid`) with time given explicitly: the view a process decides on,
its deltas, the merge of Redis's answers, the overshoot bound over several simulated processes,
the sync script's Lua and Python twins, and a sync round on a real Redis and Redis Cluster."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apigate.config.loader import ConfigError, load_config
from apigate.policies.limits.algorithms import Algorithm, FixedWindow, SlidingWindow
from apigate.policies.limits.hybrid import Delta, HybridCounters
from apigate.policies.limits.sync import SYNC, Syncer
from apigate.state.calls import same_slot
from apigate.state.memory import MemoryState
from apigate.state.redis import RedisState
from tests.support.load import most_within
from tests.support.redis import RedisServer
from tests.support.state import Run, until

T0 = 1_699_999_980_000  # a window edge (a multiple of 60 s)
W = 60_000


def take(counters: HybridCounters, now: int, times: int = 1, key: str = "k") -> int:
    return sum(counters.take(key, now, 1) for _ in range(times))


def sync_with(counters: HybridCounters, redis: MemoryState, prefix: str = "") -> list[Delta]:
    """One sync of ``counters`` through the Python twin of the script, answered at once."""
    batch = counters.collect()
    for delta in batch:
        reply = SYNC.python(redis, same_slot(prefix + delta.key, "rl"), _args(counters, delta))
        counters.apply(delta, *reply)
    return batch


def _args(counters: HybridCounters, delta: Delta) -> list[Any]:
    return [str(n) for n in (delta.index, delta.added, delta.before, counters.algorithm.window_ms)]


# -- one process's view ----------------------------------------------------------------------------
def test_a_process_decides_on_its_view_and_queues_a_key_once_per_sync() -> None:
    counters = HybridCounters(FixedWindow(10, W))
    assert take(counters, T0 + 5, 12) == 10  # alone, a process is exact
    assert counters.queue == ["k"]  # once, however many requests
    assert counters.take("other", T0 + 5, 1)
    [first, second] = counters.collect()
    assert (first.key, first.index, first.added, first.before) == ("k", T0 // W, 10, 0)
    assert (second.key, second.added) == ("other", 1)
    assert counters.queue == [] and counters.unsent() == 0
    assert take(counters, T0 + 6) == 0
    assert counters.queue == ["k"]  # a refusing key is synced too: its view learns of a reset


def test_an_answer_becomes_the_view_and_what_was_admitted_meanwhile_stays_counted() -> None:
    counters = HybridCounters(FixedWindow(100, W))
    take(counters, T0, 30)
    [delta] = counters.collect()
    take(counters, T0 + 1, 5)  # admitted while the sync is on its way
    counters.apply(delta, T0 // W, 80, 0)  # the cluster counted 80 with our 30
    state = counters.entries["k"]
    assert state.b == 85  # 80 + the 5 not yet sent
    assert take(counters, T0 + 2, 20) == 15
    [later] = counters.collect()
    assert later.added == 5 + 15


def test_a_failed_sync_puts_its_deltas_back_and_queues_the_key_again() -> None:
    counters = HybridCounters(FixedWindow(100, W))
    take(counters, T0, 7)
    [delta] = counters.collect()
    take(counters, T0 + 1, 2)
    counters.restore(delta)
    [again] = counters.collect()
    assert (again.added, again.before) == (9, 0)
    assert counters.entries["k"].b == 9  # the view never forgot them


def test_a_rolled_window_keeps_its_unsent_cost_as_the_previous_windows() -> None:
    counters = HybridCounters(SlidingWindow(100, W))
    take(counters, T0 + 59_000, 40)
    [delta] = counters.collect()  # in flight when the window rolls
    take(counters, T0 + 59_500, 3)  # unsent, of the window that ends
    assert take(counters, T0 + W + 1, 1) == 1
    state = counters.entries["k"]
    assert (state.a, state.b, state.c) == ((T0 + W) // W, 1, 43)  # our view of the ended window
    counters.apply(delta, T0 // W, 90, 0)  # the answer for the ended window: 90 cluster-wide
    assert state.c == 90 + 3
    [late] = counters.collect()
    assert (late.index, late.added, late.before) == ((T0 + W) // W, 1, 3)
    assert take(counters, T0 + 2 * W + W // 2) == 1  # two windows on: nothing carries over
    assert (state.b, state.c, state.stale) == (1, 1, 0)


def test_a_failed_sync_across_a_roll_puts_its_cost_on_the_previous_window() -> None:
    counters = HybridCounters(SlidingWindow(100, W))
    take(counters, T0 + 100, 4)
    [delta] = counters.collect()
    take(counters, T0 + W + 100, 1)
    counters.restore(delta)
    [again] = counters.collect()
    assert (again.index, again.added, again.before) == ((T0 + W) // W, 1, 4)


def test_an_answer_for_a_key_dropped_meanwhile_changes_nothing() -> None:
    counters = HybridCounters(FixedWindow(5, 1_000), max_keys=1)
    take(counters, T0, 1, key="a")
    [delta] = counters.collect()
    take(counters, T0, 1, key="b")  # room for one key: "a" is dropped
    counters.apply(delta, T0 // 1_000, 3, 0)
    counters.restore(delta)
    assert "a" not in counters.entries and counters.queue == ["b"]


# -- the script -------------------------------------------------------------------------------------
def test_the_script_counts_per_window_and_keeps_a_late_delta_of_the_window_before() -> None:
    redis = MemoryState(clock=lambda: 0.0)
    index = T0 // W

    def sync(at: int, added: int, before: int = 0) -> list[int]:
        return list(SYNC.python(redis, ["{k}:rl"], [str(n) for n in (at, added, before, W)]))

    assert sync(index, 5) == [index, 5, 0]
    assert sync(index, 0) == [index, 5, 0]  # a read
    assert sync(index + 1, 2, 1) == [index + 1, 2, 6]  # rolled: the 5 (and 1 late) are the previous
    assert sync(index, 3) == [index + 1, 2, 9]  # a slower process's delta of the window before
    assert sync(index + 3, 0) == [index + 3, 0, 0]  # a read writes nothing


STEPS = st.lists(st.tuples(st.integers(-1, 3), st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS)
def test_lua_and_python_twins_of_the_sync_answer_alike(redis_url: str, steps: list) -> None:
    async def answers(state: Any) -> list[list[int]]:
        index, out = T0 // W, []
        for move, added, before in steps:
            index += move
            reply = await state.run(SYNC, ["{t}:rl"], [index, added, before, W])
            out.append([int(n) for n in reply])
        return out

    async def both() -> tuple[list, list]:
        redis = RedisState(redis_url)
        await redis.open()
        try:
            await redis.client.flushdb()
            return await answers(redis), await answers(MemoryState(clock=lambda: 0.0))
        finally:
            await redis.close()

    remote, local = asyncio.run(both())
    assert remote == local


# -- several processes: the overshoot bound ---------------------------------------------------------
def simulate(
    algorithm: type[Algorithm],
    limit: int,
    gaps: list[int],
    interval: int,
    rtt: int,
    until_ms: int,
    window: int = W,
    starts: list[int] | None = None,
) -> tuple[list[list[int]], list[HybridCounters], MemoryState]:
    """Processes sharing one Redis (the script's Python twin), in integer milliseconds: process q
    gets a request every ``gaps[q]`` ms and syncs every ``interval`` ms (each at its own phase;
    as the sync task does, not before its last sync was answered); Redis runs a sync when it is
    sent, and its answer arrives ``rtt`` ms later; process q's requests start at ``starts[q]`` ms
    (0). Returns the times each process admitted at."""
    redis = MemoryState(clock=lambda: 0.0)
    processes = [HybridCounters(algorithm(limit, window)) for _ in gaps]
    admitted: list[list[int]] = [[] for _ in gaps]
    answers: dict[int, tuple[int, list[tuple[Delta, list[int]]]]] = {}  # by process: arrival, replies
    due = [interval + (q * 7) % interval for q in range(len(gaps))]
    for ms in range(until_ms + rtt + 1):
        for q, counters in enumerate(processes):
            arrival = answers.get(q)
            if arrival is not None and arrival[0] <= ms:
                del answers[q]
                for delta, reply in arrival[1]:
                    counters.apply(delta, *reply)
            if ms >= until_ms:
                continue  # the last answers arrive
            if ms >= due[q] and q not in answers:
                due[q] += interval * (1 + (ms - due[q]) // interval)
                batch = counters.collect()
                replies = [SYNC.python(redis, ["{k}:rl"], _args(counters, delta)) for delta in batch]
                answers[q] = (ms + rtt, list(zip(batch, replies, strict=True)))
            late = ms < (starts[q] if starts else 0)
            if not late and ms % gaps[q] == q % gaps[q] and counters.take("k", T0 + ms, 1):
                admitted[q].append(ms)
    return admitted, processes, redis


def unseen_bound(admitted: list[list[int]], limit: int, interval: int, rtt: int) -> int:
    """README's bound over the limit: the sum, over every process but the last to admit, of what
    it admitted within 2D (D: the interval, or the round trip if longer, plus a round trip; and
    the millisecond of a sync, whose requests are decided before its answer arrives)."""
    span = 2 * (max(interval, rtt) + rtt) + 1
    unseen = [min(limit, most_within(times, span)) for times in admitted]
    return sum(unseen) - min(unseen)  # not knowing which process admitted last: the largest


# Processes getting a request every 1 to 4 ms, syncing every 5 to 40 ms, with round trips of 0 to 10 ms.
SIMULATED = {
    "algorithm": st.sampled_from([FixedWindow, SlidingWindow]),
    "gaps": st.lists(st.integers(1, 4), min_size=2, max_size=4),
    "interval": st.integers(5, 40),
    "rtt": st.integers(0, 10),
}


@settings(max_examples=150, deadline=None)
@given(limit=st.integers(20, 300), **SIMULATED)
def test_processes_admit_at_least_the_limit_and_at_most_the_bound_over_it(
    algorithm: type[Algorithm], limit: int, gaps: list[int], interval: int, rtt: int
) -> None:
    """README's bound: what one process cannot see of the others is at most what they admitted
    within 2 x (sync_interval + round trip); over the limit, the cluster admits at most the sum
    of that over all processes but one (and never more than the limit each)."""
    admitted, processes, redis = simulate(algorithm, limit, gaps, interval, rtt, 1_500)
    total = sum(len(times) for times in admitted)
    demand = sum(len(range(q % gap, 1_500, gap)) for q, gap in enumerate(gaps))
    assert total >= min(limit, demand)  # never under-admits
    assert all(len(times) <= limit for times in admitted)
    bound = unseen_bound(admitted, limit, interval, rtt)
    assert total <= limit + bound, (total, limit, bound)
    # Once the last deltas are sent Redis holds exactly what was admitted, and every view learns it.
    for counters in processes:
        sync_with(counters, redis)
    assert redis.get("{k}:rl").b == total
    for counters in processes:
        sync_with(counters, redis)
        assert counters.entries["k"].b == total


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(10, 80), window=st.sampled_from([100, 250, 700]), **SIMULATED)
def test_across_window_edges_the_counts_stay_within_the_bound(
    algorithm: type[Algorithm], limit: int, gaps: list[int], interval: int, rtt: int, window: int
) -> None:
    """Windows roll during the run: a fixed window's count, or a sliding window's weighted estimate
    (made of the true counts) at every admission, stays within the limit plus the bound."""
    admitted, _, _ = simulate(algorithm, limit, gaps, interval, rtt, 2_000, window)
    bound = unseen_bound(admitted, limit, interval, rtt)
    per_window: dict[int, int] = {}
    for times in admitted:
        for ms in times:
            per_window[(T0 + ms) // window] = per_window.get((T0 + ms) // window, 0) + 1
    if algorithm is FixedWindow:
        assert max(per_window.values()) <= limit + bound
        return
    for ms in sorted(ms for times in admitted for ms in times):
        index = (T0 + ms) // window
        current = sum(1 for times in admitted for at in times if (T0 + at) // window == index and at <= ms)
        left = window - (T0 + ms) % window
        assert per_window.get(index - 1, 0) * left / window + current <= limit + bound


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(20, 200), starts=st.lists(st.integers(0, 1_000), min_size=4, max_size=4), **SIMULATED
)
def test_a_process_that_starts_late_decides_blindly_only_until_its_first_answer(
    algorithm: type[Algorithm], limit: int, gaps: list[int], interval: int, rtt: int, starts: list[int]
) -> None:
    """A process that comes to a key late (or after a pause) decides on what it last heard until
    its first answer: what it admits then is counted in the same bound."""
    slow = [gap * 5 for gap in gaps]  # the early ones spread their admissions
    admitted, _, _ = simulate(algorithm, limit, slow, interval, rtt, 1_500, starts=starts[: len(gaps)])
    assert sum(len(times) for times in admitted) <= limit + unseen_bound(admitted, limit, interval, rtt)


def test_a_long_interval_lets_each_process_spend_the_limit_and_one_sync_stops_them() -> None:
    """The cap: with nothing heard from Redis, each process admits the limit on its own."""
    admitted, processes, redis = simulate(FixedWindow, 50, [1, 1, 2], 60_000, 1, 500)
    assert [len(times) for times in admitted] == [50, 50, 50]
    for counters in processes:
        sync_with(counters, redis)
    assert redis.get("{k}:rl").b == 150
    for counters in processes:
        sync_with(counters, redis)
    assert [take(counters, T0 + 501) for counters in processes] == [0, 0, 0]


# -- the sync task on a real Redis --------------------------------------------------------------------
def _watch(syncer: Syncer, counters: HybridCounters, state: Any, prefix: str) -> None:
    syncer.watch(counters, prefix, 0.02, lambda: state, "rate-limit")


@pytest.mark.parametrize("redis", ["redis", "cluster"])
def test_the_sync_task_merges_two_processes_through_redis(
    redis: str, request: pytest.FixtureRequest, run: Run
) -> None:
    url = request.getfixturevalue("redis_url" if redis == "redis" else "redis_cluster_url")

    async def scenario() -> None:
        states = [RedisState(url), RedisState(url)]
        for state in states:
            await state.open()
        syncers = [Syncer(), Syncer()]
        processes = [HybridCounters(FixedWindow(100, W)), HybridCounters(FixedWindow(100, W))]
        keys = [f"client-{n}" for n in range(40)]  # spread over the cluster's nodes
        for syncer, counters, state in zip(syncers, processes, states, strict=True):
            _watch(syncer, counters, state, "route\x1frate-limit:l\x1f")
            syncer.start()
        first, second = processes
        assert all(take(first, T0, 30, key) == 30 for key in keys)
        await until(lambda: first.unsent() == 0)
        assert all(take(second, T0, 30, key) == 30 for key in keys)  # it has heard nothing yet
        await until(lambda: second.unsent() == 0 and all(second.entries[k].b == 60 for k in keys))
        assert all(take(first, T0, 1, key) == 1 for key in keys)  # a request: its key is synced
        await until(lambda: all(first.entries[k].b == 61 for k in keys))
        # Both hammer one key within an interval: each fills its own view.
        assert (take(first, T0 + 1, 50, keys[0]), take(second, T0 + 1, 50, keys[0])) == (39, 40)

        def both_refuse_knowing_140() -> bool:
            refused = [not counters.take(keys[0], T0 + 2, 1) for counters in processes]
            return all(refused) and all(counters.entries[keys[0]].b == 140 for counters in processes)

        await until(both_refuse_knowing_140)
        hash_key = states[0].key(same_slot("route\x1frate-limit:l\x1f" + keys[0], "rl")[0])
        assert await states[0].client.hget(hash_key, "c") == b"140"
        for state in states:
            await state.close()

    run(scenario())


def test_deltas_wait_out_an_outage_and_closing_the_backend_sends_the_last(
    tmp_path: Any, run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path / "redis").start()

    async def scenario() -> None:
        state = RedisState(server.url)
        await state.open()
        syncer = Syncer()
        counters = HybridCounters(FixedWindow(100, W))
        _watch(syncer, counters, state, "")
        syncer.start()
        take(counters, T0, 10)
        await until(lambda: counters.queue == [] and counters.unsent() == 0)
        server.stop()
        take(counters, T0, 5)
        await until(lambda: "Redis at" in caplog.text)
        failed = syncer.failed_rounds
        await until(lambda: syncer.failed_rounds >= failed + 3)  # intervals go by: the 5 wait
        assert counters.unsent() == 5
        server.start()  # empty: only what waited reaches it
        await until(lambda: counters.unsent() == 0)
        assert counters.entries["k"].b == 5  # the view follows Redis
        assert caplog.text.count("Redis at") == 1 and "Redis answers again" in caplog.text
        rounds = syncer.rounds
        syncer.watch(counters, "", 60.0, lambda: state, "rate-limit")  # one sync now, the next in a minute
        take(counters, T0, 1)
        await until(lambda: syncer.rounds > rounds and counters.unsent() == 0)
        take(counters, T0, 6)
        await state.close()  # sends the 7 first
        assert counters.unsent() == 0

    try:
        with caplog.at_level(logging.WARNING, logger="apigate.limits"):
            run(scenario())
        assert server.proc is not None
        import redis as redis_py

        with redis_py.Redis(port=server.port) as client:
            assert client.hget(f"apigate:{same_slot('k', 'rl')[0]}", "c") == b"12"
    finally:
        server.stop()


# -- config -----------------------------------------------------------------------------------------
def _route(policy: str) -> str:
    return (
        "state: {url: 'redis://127.0.0.1:9/0'}\n"
        "routes:\n"
        "  - path: /api/*\n"
        "    target: http://127.0.0.1:9\n"
        "    policies:\n"
        f"      {policy}\n"
    )


@pytest.mark.parametrize(
    ("policy", "field", "says"),
    [
        (
            "rate-limit: {backend: hybrid, limits: [{rate: 10/s, algorithm: token_bucket}]}",
            "rate-limit.limits",
            "a token bucket's level",
        ),
        (
            "rate-limit: {backend: hybrid, algorithm: sliding_log, limits: [{rate: 10/s}]}",
            "rate-limit.limits",
            "a sliding log keeps",
        ),
        (
            "rate-limit: {backend: hybrid, tiers: {plans: {free: [{rate: 1/s, algorithm: leaky_bucket, "
            "max_delay: 1s}]}}}",
            "rate-limit",
            "tiers.plans.free: limit 0: backend: hybrid",
        ),
        ("spike-arrest: {rate: 10/s, backend: hybrid}", "spike-arrest.backend", "sliding log"),
        (
            "rate-limit: {backend: hybrid, sync_interval: 5ms, limits: [{rate: 1/s}]}",
            "rate-limit.sync_interval",
            "10ms",
        ),
        (
            "rate-limit: {backend: hybrid, sync_interval: 2m, limits: [{rate: 1/s}]}",
            "rate-limit.sync_interval",
            "60s",
        ),
        (
            "rate-limit: {sync_interval: 1s, limits: [{rate: 1/s}]}",
            "rate-limit.sync_interval",
            "backend: hybrid only",
        ),
        (
            "rate-limit: {backend: hybrid, on_redis_error: deny, limits: [{rate: 1/s}]}",
            "rate-limit.on_redis_error",
            "needs backend: state",
        ),
    ],
)
def test_what_hybrid_cannot_count_is_a_config_error_naming_the_field(
    policy: str, field: str, says: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(text=_route(policy), environ={})
    message = str(raised.value)
    assert f"routes[0].policies.{field}" in message and "line 6" in message, message
    assert says in message


def test_hybrid_windows_are_valid_config() -> None:
    config = load_config(
        text=_route(
            "rate-limit: {backend: hybrid, sync_interval: 250ms, limits: [{rate: 10/s}, "
            "{name: daily, limit: 1000, window: 1d, algorithm: fixed_window}]}"
        ),
        environ={},
    )
    assert config.routes[0].policies["rate-limit"]["sync_interval"] == "250ms"
