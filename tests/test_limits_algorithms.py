"""The limiting algorithms at their boundaries, with time given explicitly (integer milliseconds),
and their Lua twins on a real Redis answering exactly as the Python steps do."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis as redis_py
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apigate.policies.limits.algorithms import (
    ALGORITHMS,
    FixedWindow,
    LeakyBucket,
    MemoryCounters,
    SlidingLog,
    SlidingWindow,
    TokenBucket,
)
from apigate.policies.limits.config import Algorithm
from apigate.policies.limits.scripts import SCRIPTS
from apigate.state.memory import MemoryState
from apigate.state.redis import RedisState

T0 = 1_699_999_980_000  # a window edge for every window here (a multiple of 60 s and 7 s)


def admitted(counters: MemoryCounters, now: int, times: int = 1, key: str = "k") -> int:
    return sum(counters.take(key, now, 1) for _ in range(times))


def test_every_algorithm_the_config_offers_exists() -> None:
    assert set(ALGORITHMS) == set(Algorithm.__args__)  # type: ignore[attr-defined]


def test_fixed_window_counts_per_window_and_allows_a_burst_across_the_edge() -> None:
    counters = MemoryCounters(FixedWindow(10, 60_000))
    assert admitted(counters, T0 + 59_000, 15) == 10
    algorithm = counters.algorithm
    assert (algorithm.remaining, algorithm.retry_ms, algorithm.reset_ms) == (0, 1_000, 1_000)
    # One millisecond before the edge: still refused; at the edge a whole new window.
    assert admitted(counters, T0 + 59_999) == 0
    assert admitted(counters, T0 + 60_000, 15) == 10  # 20 within 1 s: the fixed window's weakness
    assert counters.take("other", T0 + 60_000, 1)  # keys count apart


def test_sliding_window_weighs_the_previous_window_by_its_overlap() -> None:
    counters = MemoryCounters(SlidingWindow(10, 60_000))
    assert admitted(counters, T0 + 59_000, 10) == 10
    # 1 s into the next window, the previous 10 still weigh 10 x 59/60 = 9.83: nothing fits.
    assert admitted(counters, T0 + 61_000) == 0
    retry = counters.algorithm.retry_ms
    # Room for one once 10 x (60 - e)/60 <= 9, i.e. e >= 6 s: retry says 5 s from e = 1 s.
    assert retry == 5_000
    assert admitted(counters, T0 + 60_000 + 5_999) == 0
    assert admitted(counters, T0 + 60_000 + 6_000) == 1
    # Half a window in: 5 of the previous still count, plus the 1 just taken: 4 more fit.
    assert admitted(counters, T0 + 90_000, 10) == 4
    # Two windows later nothing counts any more.
    assert admitted(counters, T0 + 180_000, 20) == 10


def test_sliding_log_is_exact_at_every_moment() -> None:
    counters = MemoryCounters(SlidingLog(3, 10_000))
    assert admitted(counters, T0 + 1_000) == 1
    assert admitted(counters, T0 + 5_000, 2) == 2
    assert admitted(counters, T0 + 10_999) == 0
    assert counters.algorithm.retry_ms == 1  # the stamp of T0+1000 leaves at T0+11000
    assert admitted(counters, T0 + 11_000) == 1
    assert admitted(counters, T0 + 14_999) == 0
    assert admitted(counters, T0 + 15_000, 3) == 2  # both stamps of T0+5000 left


def test_token_bucket_allows_the_burst_then_refills_at_the_rate() -> None:
    # 10 per second, bursts of 50 (the seed numbers of TOKEN_BUCKET_CAPACITY / REFILL_RATE).
    counters = MemoryCounters(TokenBucket(10, 1_000, burst=50))
    assert admitted(counters, T0, 60) == 50
    assert counters.algorithm.retry_ms == 100  # one token every 100 ms
    assert admitted(counters, T0 + 99) == 0
    assert admitted(counters, T0 + 100) == 1
    assert admitted(counters, T0 + 1_100, 20) == 10  # a second refills 10
    assert counters.algorithm.remaining == 0
    # Idle long enough, the bucket is full again, never fuller.
    assert admitted(counters, T0 + 3_600_000, 60) == 50


def test_leaky_bucket_delays_within_max_delay_and_refuses_beyond() -> None:
    # 10 per second: one request leaves every 100 ms; at most 1 s of waiting.
    counters = MemoryCounters(LeakyBucket(10, 1_000, max_delay_ms=1_000))
    delays = []
    for _ in range(13):
        if counters.take("k", T0, 1):
            delays.append(counters.algorithm.delay_ms)
    assert delays == [i * 100 for i in range(11)]  # waits of 0, 100 ... 1000 ms; 2 refused
    assert counters.algorithm.retry_ms == 100
    assert counters.take("k", T0 + 100, 1)
    assert counters.algorithm.delay_ms == 1_000


def test_memory_counters_forget_expired_keys_and_stay_bounded() -> None:
    counters = MemoryCounters(FixedWindow(1, 1_000), max_keys=100)
    for n in range(1_000):
        counters.take(f"client-{n}", T0, 1)
    assert len(counters.entries) <= 100
    counters.sweep(T0 + 1_000)
    assert counters.entries == {}


# -- the Lua twins ---------------------------------------------------------------------------------
ARGS = st.tuples(
    st.sampled_from(sorted(ALGORITHMS)),
    st.integers(1, 20),  # limit
    st.sampled_from([1_000, 7_000, 60_000]),  # window
    st.integers(0, 30),  # burst (0: the limit)
    st.sampled_from([0, 500, 3_000]),  # max delay
)
STEPS = st.lists(st.tuples(st.integers(0, 4_000), st.integers(1, 3)), min_size=1, max_size=40)


async def _answers(
    state: Any, algorithm: str, numbers: tuple[int, ...], steps: list[tuple[int, int]]
) -> list:
    limit, window, burst, max_delay = numbers
    now = T0 + 123
    out = []
    for gap, cost in steps:
        now += gap
        answer = await state.run(
            SCRIPTS[algorithm], ["{t}", "{t}:seq"], [now, limit, window, burst, max_delay, cost]
        )
        out.append([int(x) for x in answer])
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=ARGS, steps=STEPS)
def test_lua_and_python_give_the_same_decisions(redis_url: str, args: tuple, steps: list) -> None:
    algorithm, *numbers = args
    if algorithm == "leaky_bucket" and numbers[3] == 0 and numbers[0] < 2:
        numbers[3] = 500

    async def both() -> tuple[list, list]:
        redis = RedisState(redis_url)
        await redis.open()
        try:
            await redis.client.flushdb()
            remote = await _answers(redis, algorithm, tuple(numbers), steps)
        finally:
            await redis.close()
        local = await _answers(MemoryState(clock=lambda: 0.0), algorithm, tuple(numbers), steps)
        return remote, local

    remote, local = asyncio.run(both())
    assert remote == local


BATCHES = st.lists(
    st.tuples(st.integers(0, 4_000), st.lists(st.tuples(st.integers(0, 2), st.integers(1, 3)), min_size=1)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=ARGS, batches=BATCHES)
def test_a_batch_decides_as_its_calls_one_by_one(redis_url: str, args: tuple, batches: list) -> None:
    """The batch form (the decisions of one loop turn on one server, several on one counter:
    read once, written once) leaves the same answers and the same counters as the calls alone."""
    algorithm, *numbers = args
    if algorithm == "leaky_bucket" and numbers[3] == 0 and numbers[0] < 2:
        numbers[3] = 500
    script = SCRIPTS[algorithm]
    assert script.batch_lua is not None

    def keys(index: int) -> list[str]:
        return [f"{{t{index}}}", f"{{t{index}}}:seq"]

    def run(client: redis_py.Redis, batched: bool) -> tuple[list, list]:
        client.flushdb()
        now, answers = T0 + 123, []
        for gap, calls in batches:
            now += gap
            each = [(keys(index), [now, *numbers, cost]) for index, cost in calls]
            if batched:
                flat_keys = [key for call_keys, _ in each for key in call_keys]
                flat_args = [arg for _, call_args in each for arg in call_args]
                answers += client.eval(script.batch_lua, len(flat_keys), *flat_keys, *flat_args)
            else:
                answers += [
                    client.eval(script.lua, 2, *call_keys, *call_args) for call_keys, call_args in each
                ]
        kept = []
        for index in range(3):
            key = keys(index)[0]
            kind = client.type(key)
            stored = client.zrange(key, 0, -1, withscores=True) if kind == b"zset" else client.hgetall(key)
            kept.append((stored, client.pttl(key) // 50))  # expiry: the same, to a few ms
        return answers, kept

    with redis_py.Redis.from_url(redis_url) as client:
        alone, alone_kept = run(client, batched=False)
        together, together_kept = run(client, batched=True)
    assert together == alone
    assert [stored for stored, _ in together_kept] == [stored for stored, _ in alone_kept]
    assert all(abs(a - b) <= 1 for (_, a), (_, b) in zip(together_kept, alone_kept, strict=True))


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_lua_counts_exactly_near_the_largest_allowed_numbers(redis_url: str, algorithm: str) -> None:
    """Large products stay exact in Lua's doubles (idiv corrects the division's rounding)."""
    limit, window = 10**6, 2**51 // 10**6 // 2  # limit x window near MAX_PRODUCT / 2
    steps = [(0, 1), (1, 999), (window // 3, 5), (window, 1)]

    async def both() -> tuple[list, list]:
        redis = RedisState(redis_url)
        await redis.open()
        try:
            remote = await _answers(redis, algorithm, (limit, window, 0, 1_000), steps)
        finally:
            await redis.close()
        return remote, await _answers(MemoryState(), algorithm, (limit, window, 0, 1_000), steps)

    remote, local = asyncio.run(both())
    assert remote == local
