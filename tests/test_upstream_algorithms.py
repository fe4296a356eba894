"""Balancers, circuit breakers, passive ejection, backoff and the retry budget, told the time.

No sockets here: the state machines and pickers are driven with explicit times and stand-in
exchanges, so every transition is checked exactly. tests/test_upstream_resilience.py runs them
through a gateway against real upstreams.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Iterator
from typing import Any

import pytest

from apigate.config.upstreams import RetryConfig
from apigate.engine.balancers import (
    Balancer,
    ConsistentHash,
    LeastConnections,
    PowerOfTwoChoices,
    Sticky,
    stable_hash,
)
from apigate.engine.breakers import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Breaker,
    BreakerSettings,
    EjectionSettings,
    TargetState,
    TargetStates,
)
from apigate.engine.plan import Target
from apigate.engine.retries import RetryBudget
from apigate.engine.upstream import ConnectionPool


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def make_targets(
    loop: asyncio.AbstractEventLoop, count: int, weights: list[int] | None = None
) -> list[Target]:
    targets = []
    for index in range(count):
        host = f"10.0.0.{index + 1}"
        pool = ConnectionPool(loop, "http", host, 80, None, 10, 60.0)
        key = f"up/http://{host}:80"
        weight = weights[index] if weights else 1
        targets.append(
            Target(
                "http",
                host,
                80,
                host.encode(),
                weight,
                pool,
                TargetState(key),
                f"{stable_hash(key.encode()):016x}",
            )
        )
    return targets


class FakeExchange:
    """What balancers read of an exchange: client IP, headers, params, and response lines."""

    def __init__(
        self,
        client_ip: str = "192.0.2.1",
        headers: list[tuple[bytes, bytes]] | None = None,
        params: dict[str, str] | None = None,
    ) -> None:
        self.client_ip = client_ip
        self.headers = headers or []
        self.params = params or {}
        self.response_lines = b""

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


def picks(
    balancer: Balancer, count: int, exchange: Any = None, now: float = 100.0
) -> collections.Counter[str]:
    found: collections.Counter[str] = collections.Counter()
    for _ in range(count):
        target = balancer.pick(exchange or FakeExchange(), None, now)
        assert target is not None
        found[target.host] += 1
    return found


# -- balancers --
def test_round_robin_is_even_and_skips_unusable_targets(loop: asyncio.AbstractEventLoop) -> None:
    targets = make_targets(loop, 3)
    balancer = Balancer(targets)
    assert picks(balancer, 30) == {"10.0.0.1": 10, "10.0.0.2": 10, "10.0.0.3": 10}
    targets[1].state.healthy = False
    assert picks(balancer, 30) == {"10.0.0.1": 15, "10.0.0.3": 15}
    targets[0].state.ejected_until = 200.0
    targets[0].state.update_blocked()
    assert picks(balancer, 10) == {"10.0.0.3": 10}
    assert picks(balancer, 10, now=200.0) == {"10.0.0.1": 5, "10.0.0.3": 5}  # the ejection ended


def test_weighted_round_robin_is_smooth_and_exact(loop: asyncio.AbstractEventLoop) -> None:
    balancer = Balancer(make_targets(loop, 3, [1, 2, 3]))
    order = [balancer.pick(FakeExchange(), None, 0.0).host for _ in range(6)]  # type: ignore[union-attr]
    assert collections.Counter(order) == {"10.0.0.1": 1, "10.0.0.2": 2, "10.0.0.3": 3}
    assert order[0] != order[1]  # smooth: the heaviest is not served in a burst
    assert picks(balancer, 600) == {"10.0.0.1": 100, "10.0.0.2": 200, "10.0.0.3": 300}


def test_nothing_usable_is_none_and_a_retry_may_reuse_the_only_one(loop: asyncio.AbstractEventLoop) -> None:
    targets = make_targets(loop, 2)
    for balancer in (Balancer(targets), LeastConnections(targets), PowerOfTwoChoices(targets)):
        targets[0].state.healthy = False
        assert balancer.pick(FakeExchange(), targets[1], 0.0) is targets[1]  # excluded, but the only one
        targets[1].state.healthy = False
        assert balancer.pick(FakeExchange(), None, 0.0) is None
        targets[0].state.healthy = targets[1].state.healthy = True


def test_least_connections_prefers_the_idle_target_for_its_weight(loop: asyncio.AbstractEventLoop) -> None:
    targets = make_targets(loop, 3, [1, 1, 2])
    balancer = LeastConnections(targets)
    targets[0].state.in_flight = 5
    targets[1].state.in_flight = 1
    targets[2].state.in_flight = 1  # weight 2: load 0.5
    assert balancer.pick(FakeExchange(), None, 0.0) is targets[2]
    targets[2].state.in_flight = 4  # load 2
    assert balancer.pick(FakeExchange(), None, 0.0) is targets[1]
    for target in targets:
        target.state.in_flight = 0
    assert picks(balancer, 300) == {"10.0.0.1": 100, "10.0.0.2": 100, "10.0.0.3": 100}  # ties rotate


def test_p2c_spreads_evenly_and_shuns_a_slow_or_busy_target(loop: asyncio.AbstractEventLoop) -> None:
    targets = make_targets(loop, 3)
    balancer = PowerOfTwoChoices(targets)
    even = picks(balancer, 3000)
    assert all(800 <= n <= 1200 for n in even.values()), even
    targets[0].state.note_latency(0.5, 100.0)  # slow: 500 ms against 5 ms
    targets[1].state.note_latency(0.005, 100.0)
    targets[2].state.note_latency(0.005, 100.0)
    slow = picks(balancer, 3000)
    assert slow["10.0.0.1"] < 150, slow  # only when both draws are the slow one... which P2C avoids
    targets[0].state.latency = 0.005
    targets[1].state.in_flight = 50
    busy = picks(balancer, 3000)
    assert busy["10.0.0.2"] < 150, busy


def test_peak_latency_average_reacts_to_slow_answers_at_once(loop: asyncio.AbstractEventLoop) -> None:
    state = TargetState("x")
    state.note_latency(0.010, 1.0)
    state.note_latency(0.200, 1.0)
    assert state.latency == 0.200
    for _ in range(20):
        state.note_latency(0.010, 1.0)
    assert state.latency < 0.011


def test_an_idle_slow_target_fades_back_into_p2c(loop: asyncio.AbstractEventLoop) -> None:
    targets = make_targets(loop, 3)
    balancer = PowerOfTwoChoices(targets)
    targets[0].state.note_latency(0.300, 100.0)  # slow once, then no traffic
    for target in targets[1:]:
        target.state.note_latency(0.005, 160.0)
    assert targets[0].state.recent_latency(100.0) == pytest.approx(0.300)
    assert targets[0].state.recent_latency(105.0) == pytest.approx(0.300 / math.e)
    later = picks(balancer, 3000, now=160.0)  # 60 s on: 0.3 x e^-12, far below the others' 5 ms
    assert later["10.0.0.1"] > 1000, later


def test_hash_keeps_a_key_on_its_target_and_spreads_keys(loop: asyncio.AbstractEventLoop) -> None:
    targets = make_targets(loop, 3)
    balancer = ConsistentHash(targets, "header", "X-User")
    users = [FakeExchange(headers=[(b"x-user", f"user-{i}".encode())]) for i in range(3000)]
    first = [balancer.pick(user, None, 0.0) for user in users]
    assert [balancer.pick(user, None, 0.0) for user in users] == first
    spread = collections.Counter(t.host for t in first if t is not None)
    assert all(700 <= n <= 1300 for n in spread.values()), spread
    # Its target down: the key goes to the next target on the ring, and comes back after.
    moved_user = users[0]
    home = first[0]
    assert home is not None
    home.state.healthy = False
    elsewhere = balancer.pick(moved_user, None, 0.0)
    assert elsewhere is not None and elsewhere is not home
    home.state.healthy = True
    assert balancer.pick(moved_user, None, 0.0) is home


def test_hash_moves_about_one_in_n_keys_when_a_target_joins(loop: asyncio.AbstractEventLoop) -> None:
    four = make_targets(loop, 4)
    before = ConsistentHash(four[:3], "ip")
    after = ConsistentHash(four, "ip")
    clients = [FakeExchange(client_ip=f"198.51.{i // 250}.{i % 250}") for i in range(10000)]
    moved = 0
    for client in clients:
        old, new = before.pick(client, None, 0.0), after.pick(client, None, 0.0)
        if old is not new:
            moved += 1
            assert new is four[3]  # a key only ever moves to the new target
    assert 0.18 <= moved / len(clients) <= 0.32, moved  # ideal: 1/4


@pytest.mark.parametrize(
    ("source", "key", "exchange"),
    [
        ("ip", "", FakeExchange(client_ip="203.0.113.9")),
        ("cookie", "session", FakeExchange(headers=[(b"cookie", b"a=1; session=abc; b=2")])),
        ("param", "tenant", FakeExchange(params={"tenant": "acme"})),
    ],
)
def test_hash_reads_its_key_from_ip_cookie_or_param(
    loop: asyncio.AbstractEventLoop, source: str, key: str, exchange: FakeExchange
) -> None:
    balancer = ConsistentHash(make_targets(loop, 5), source, key)
    assert balancer.key_of(exchange) is not None  # type: ignore[arg-type]
    assert len(picks(balancer, 50, exchange)) == 1


def test_hash_without_its_key_balances_round_robin(loop: asyncio.AbstractEventLoop) -> None:
    balancer = ConsistentHash(make_targets(loop, 3), "header", "x-user")
    assert picks(balancer, 30) == {"10.0.0.1": 10, "10.0.0.2": 10, "10.0.0.3": 10}


def test_sticky_pins_by_cookie_and_moves_the_pin_when_the_target_is_down(
    loop: asyncio.AbstractEventLoop,
) -> None:
    targets = make_targets(loop, 3)
    balancer = Sticky(targets, Balancer(targets), "pin", b"; Path=/")
    fresh = FakeExchange()
    chosen = balancer.pick(fresh, None, 0.0)
    assert chosen is not None
    assert fresh.response_lines == b"set-cookie: pin=" + chosen.id.encode() + b"; Path=/\r\n"
    assert chosen.host.encode() not in fresh.response_lines  # the id says nothing of the address
    pinned = FakeExchange(headers=[(b"cookie", b"pin=" + chosen.id.encode())])
    assert picks(balancer, 20, pinned) == {chosen.host: 20}
    assert pinned.response_lines == b""  # a kept pin sets no cookie
    chosen.state.healthy = False
    other = balancer.pick(pinned, None, 0.0)
    assert other is not None and other is not chosen
    assert pinned.response_lines == b"set-cookie: pin=" + other.id.encode() + b"; Path=/\r\n"
    forged = FakeExchange(headers=[(b"cookie", b"pin=10.0.0.1")])
    assert balancer.pick(forged, None, 0.0) is not None and forged.response_lines  # unknown id: a new pin


def test_a_sticky_retry_replaces_the_cookie_of_the_failed_attempt(loop: asyncio.AbstractEventLoop) -> None:
    targets = make_targets(loop, 2)
    balancer = Sticky(targets, Balancer(targets), "pin", b"")
    exchange = FakeExchange()
    first = balancer.pick(exchange, None, 0.0)
    second = balancer.pick(exchange, first, 0.0)
    assert second is not None and second is not first
    assert exchange.response_lines == b"set-cookie: pin=" + second.id.encode() + b"\r\n"


# -- circuit breaker --
def test_circuit_full_cycle_by_consecutive_failures() -> None:
    breaker = Breaker("up", BreakerSettings(failures=5, recovery=30.0, half_open_requests=2))
    for second in range(4):
        breaker.failure(float(second))
    breaker.success(4.0)  # a success in between resets the count
    for second in range(5, 9):
        breaker.failure(float(second))
    assert breaker.state == CLOSED and breaker.admit(9.0)
    breaker.failure(9.0)
    assert breaker.state == OPEN and breaker.reason == "5 consecutive failures"
    assert not breaker.admit(9.0) and not breaker.admit(38.9)
    assert breaker.blocked_until() == 39.0
    # Recovery over: half-open, two probes admitted, a third waits.
    assert breaker.admit(39.0) and breaker.state == HALF_OPEN
    assert breaker.admit(39.1) and not breaker.admit(39.2)
    breaker.failure(39.5)  # a probe failed: open again, for another recovery period
    assert breaker.state == OPEN and breaker.blocked_until() == 69.5
    assert breaker.admit(69.5) and breaker.admit(69.5)
    breaker.success(70.0)
    assert breaker.state == HALF_OPEN  # one of two probes
    breaker.success(70.1)
    assert breaker.state == CLOSED and breaker.admit(70.2)


def test_a_probe_that_never_reports_stops_blocking_after_the_recovery_period() -> None:
    breaker = Breaker("up", BreakerSettings(failures=1, recovery=10.0))
    breaker.failure(0.0)
    assert breaker.admit(10.0)
    assert not breaker.admit(15.0)  # the probe is out
    assert breaker.admit(20.0)  # it never came back: another probe


def test_circuit_opens_on_error_rate_only_over_the_minimum_volume() -> None:
    settings = BreakerSettings(failures=0, error_rate=0.5, window=10.0, min_requests=10, recovery=5.0)
    breaker = Breaker("up", settings)
    for index in range(4):
        breaker.failure(float(index))
    assert breaker.state == CLOSED  # 4 of 4 failed, but under the volume
    for index in range(5):
        breaker.success(4.0 + index * 0.1)
    breaker.failure(5.0)  # 5 of 10 failed
    assert breaker.state == OPEN and "5 of 10" in breaker.reason


def test_error_rate_window_forgets_old_requests() -> None:
    breaker = Breaker("up", BreakerSettings(failures=0, error_rate=0.5, window=10.0, min_requests=4))
    for index in range(3):
        breaker.failure(float(index))
    for index in range(10):
        breaker.success(20.0 + index * 0.1)  # the failures are 20 s old: out of the window
    breaker.failure(21.5)
    assert breaker.state == CLOSED


def test_circuit_changes_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    breaker = Breaker("users/http://10.0.0.1:80", BreakerSettings(failures=2, recovery=1.0))
    with caplog.at_level("WARNING", logger="apigate"):
        for now in (0.0, 0.1, 0.2, 0.3):  # the later failures meet an open circuit
            breaker.failure(now)
        breaker.admit(1.5)
        breaker.success(1.6)
    lines = [r.getMessage() for r in caplog.records if "circuit" in r.getMessage()]
    assert lines == [
        "circuit users/http://10.0.0.1:80 open (2 consecutive failures)",
        "circuit users/http://10.0.0.1:80 half_open (recovery period over)",
        "circuit users/http://10.0.0.1:80 closed (1 probe(s) succeeded)",
    ]


def test_target_state_blocks_while_open_and_admits_one_probe() -> None:
    state = TargetState("t")
    state.breaker = Breaker("t", BreakerSettings(failures=2, recovery=10.0))
    state.failed(0.0, None, [state])
    assert state.usable(0.0)
    state.failed(1.0, None, [state])
    assert not state.usable(10.9) and state.usable(11.0)
    state.admit(11.0)  # the balancer chose it: the probe is out
    assert not state.usable(11.0)
    state.succeeded(11.2)
    assert state.usable(11.2) and state.breaker.state == CLOSED


# -- passive ejection --
def test_ejection_grows_with_repeats_and_is_forgiven_over_time() -> None:
    ejection = EjectionSettings(
        consecutive_failures=3, base_ejection=10.0, max_ejection=25.0, max_ejection_percent=100
    )
    state = TargetState("t")
    for now in (0.0, 0.1, 0.2):
        state.failed(now, ejection, [state])
    assert not state.usable(9.9) and state.usable(10.2)  # first ejection: 10 s
    for now in (11.0, 11.1, 11.2):
        state.failed(now, ejection, [state])
    assert state.ejected_until == pytest.approx(31.2)  # second: 20 s
    for now in (32.0, 32.1, 32.2):
        state.failed(now, ejection, [state])
    assert state.ejected_until == pytest.approx(57.2)  # third: capped at 25 s
    # Long quiet (10 base periods) forgives the earlier ejections: back to 10 s.
    for now in (200.0, 200.1, 200.2):
        state.failed(now, ejection, [state])
    assert state.ejected_until == pytest.approx(210.2)


def test_successes_reset_the_consecutive_count() -> None:
    ejection = EjectionSettings(consecutive_failures=3, max_ejection_percent=100)
    state = TargetState("t")
    state.failed(0.0, ejection, [state])
    state.failed(0.1, ejection, [state])
    state.succeeded(0.2)
    state.failed(0.3, ejection, [state])
    state.failed(0.4, ejection, [state])
    assert state.usable(0.5)


@pytest.mark.parametrize(
    ("targets", "percent", "most_ejected"), [(3, 10, 1), (10, 30, 3), (4, 50, 2), (2, 100, 2)]
)
def test_at_most_max_ejection_percent_are_ejected(targets: int, percent: int, most_ejected: int) -> None:
    ejection = EjectionSettings(consecutive_failures=1, base_ejection=30.0, max_ejection_percent=percent)
    states = [TargetState(f"t{i}") for i in range(targets)]
    for state in states:
        state.failed(1.0, ejection, states)
    assert sum(1 for s in states if not s.usable(2.0)) == most_ejected


# -- retries --
def test_backoff_is_full_jitter_within_the_exponential_ceiling() -> None:
    policy = RetryConfig.model_validate({"attempts": 5, "backoff": {"base": "10ms", "max": "70ms"}}).policy()
    for retry, ceiling in ((1, 0.010), (2, 0.020), (3, 0.040), (4, 0.070), (5, 0.070)):
        draws = [policy.backoff(retry) for _ in range(2000)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert min(draws) < ceiling * 0.05 and max(draws) > ceiling * 0.95  # spread over the whole range
        assert len(set(draws)) > 1900


def test_no_backoff_when_base_is_zero() -> None:
    policy = RetryConfig.model_validate({"backoff": {"base": 0}}).policy()
    assert policy.backoff(3) == 0.0


def test_retry_budget_holds_retries_to_its_share_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, window=10.0, min_per_second=0.0)
    allowed = 0
    for index in range(1000):  # 100 requests a second, every one failing and asking for a retry
        now = index / 100
        budget.request()
        allowed += budget.try_retry(now)
    assert 190 <= allowed <= 200, allowed


def test_retry_budget_floor_allows_a_few_per_second_without_traffic() -> None:
    budget = RetryBudget(ratio=0.2, window=10.0, min_per_second=3.0)
    assert sum(budget.try_retry(0.0) for _ in range(100)) == 30
    assert sum(budget.try_retry(5.0) for _ in range(100)) == 0  # the window still holds 30
    assert sum(budget.try_retry(11.0) for _ in range(100)) == 30  # the old ones left the window


def test_every_balancer_answers_none_without_targets(loop: asyncio.AbstractEventLoop) -> None:
    # A discovered upstream before anything is found has no target at all.
    balancers = [Balancer([]), LeastConnections([]), PowerOfTwoChoices([]), ConsistentHash([], "ip")]
    balancers.append(Sticky([], Balancer([]), "pin", b""))
    for balancer in balancers:
        assert balancer.pick(FakeExchange(), None, 0.0) is None


def test_a_half_open_probe_that_did_not_go_is_given_back() -> None:
    breaker = Breaker("up", BreakerSettings(failures=1, recovery=10.0))
    breaker.failure(0.0)
    assert breaker.admit(10.0) and not breaker.admit(10.1)
    breaker.cancel_probe()  # no target could take it
    assert breaker.admit(10.2)


def test_target_states_forget_what_a_new_plan_no_longer_has() -> None:
    states = TargetStates()
    kept, gone = states.state_for("up/http://a:80"), states.state_for("up/http://b:80")
    kept.ejections = gone.ejections = 2
    states.retain({"up/http://a:80"}, {"up"})
    assert states.state_for("up/http://a:80") is kept
    assert states.state_for("up/http://b:80") is not gone  # came back: afresh


def test_retry_budget_counts_requests_of_long_ago_for_the_window_only() -> None:
    budget = RetryBudget(ratio=0.2, window=10.0, min_per_second=0.0, now=0.0)
    for _ in range(1000):  # spread over 100 s, first counted at 100 s: 100 of them are recent
        budget.request()
    allowed = sum(budget.try_retry(100.0) for _ in range(100))
    assert allowed == 20
