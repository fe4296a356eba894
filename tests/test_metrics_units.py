"""The counting structures on their own: the latency sketch's stated error, merging, the last
minute's window (time given explicitly), the heavy hitters' guarantee, and the Prometheus names."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from apigate.engine.metrics import (
    RELATIVE_ERROR,
    TOP_CAPACITY,
    Meters,
    RouteMeter,
    Sketch,
    TopCounts,
)
from apigate.observe.metrics import _percentiles, json_view, merge, prometheus_text

SECONDS = st.floats(min_value=1e-5, max_value=500.0, allow_nan=False, allow_infinity=False)


def _exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


@settings(max_examples=200, deadline=None)
@given(st.lists(SECONDS, min_size=1, max_size=400))
def test_percentiles_are_within_the_stated_relative_error(values: list[float]) -> None:
    sketch = Sketch()
    for value in values:
        sketch.observe(value, 0.0)
    view = _percentiles(dict(sketch.export()["total"]))
    assert view["count"] == len(values)
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        exact = _exact(values, q) * 1000
        # (the view rounds to microseconds)
        assert abs(view[name] - exact) <= exact * RELATIVE_ERROR + 0.0005, (name, view[name], exact)


def _worker(values: list[float], now: float) -> dict:
    meters = Meters()
    meter = meters.route("r")
    for value in values:
        meter.observe("GET", 200, value, 10, 20, now)
    meters.requests_total = len(values)
    return {"meters": meters.export()}


@settings(max_examples=50, deadline=None)
@given(st.lists(SECONDS, min_size=1, max_size=200), st.lists(SECONDS, min_size=1, max_size=200))
def test_merged_workers_equal_one_worker_that_saw_everything(first: list[float], second: list[float]) -> None:
    now = 1000.0
    merged = merge([_worker(first, now), _worker(second, now)], now)
    alone = merge([_worker(first + second, now)], now)
    assert json_view(merged)["routes"] == json_view(alone)["routes"]
    assert merged.routes["r"].duration.counts == alone.routes["r"].duration.counts


def test_the_last_minute_forgets_older_slots() -> None:
    meters = Meters()
    meter = meters.route("r")

    def recent(now: float) -> int:
        return sum(merge([{"meters": meters.export()}], now).routes["r"].latency.recent.values())

    meter.observe("GET", 200, 0.010, 0, 0, 100.0)  # the slot of 100-110 s
    assert recent(105.0) == 1
    meter.observe("GET", 200, 0.020, 0, 0, 155.0)
    assert recent(159.0) == 2
    meter.observe("GET", 200, 0.030, 0, 0, 165.0)  # six slots of 10 s later: 100 s is gone
    assert recent(165.0) == 2
    assert recent(300.0) == 0
    assert sum(merge([{"meters": meters.export()}], 300.0).routes["r"].latency.total.values()) == 3
    meter.observe("GET", 200, 0.040, 0, 0, 225.0)
    assert recent(225.0) == 1


def test_heavy_hitters_keep_every_frequent_client() -> None:
    """Misra-Gries: a key seen more than n / (k + 1) times is kept, its count low by at most that."""
    top = TopCounts()
    rng = random.Random(7)
    stream = [f"10.0.{i // 250}.{i % 250}" for i in range(20_000)]  # 20,000 clients seen once each
    heavy = {"203.0.113.1": 900, "203.0.113.2": 400, "203.0.113.3": 150}
    for key, count in heavy.items():
        stream += [key] * count
    rng.shuffle(stream)
    for key in stream:
        top.add(key, 30.0)
    (_epoch, counts), *_ = top.export()
    assert len(counts) <= TOP_CAPACITY
    slack = len(stream) / (TOP_CAPACITY + 1)
    for key, count in heavy.items():
        assert count - slack <= counts.get(key, 0) <= count, (key, counts.get(key))
    assert all(counts.get(key, 0) for key, count in heavy.items() if count > slack)


def test_refusals_count_rate_limits_and_authentication_by_reason() -> None:
    meter = RouteMeter()
    meter.refused(429, "rate_limited")
    meter.refused(401, "missing_key")
    meter.refused(401, "missing_key")
    meter.refused(403, None)
    assert meter.rate_limited == 1
    assert meter.auth_failures == {"missing_key": 2, "denied": 1}


def test_consumers_by_name_are_capped() -> None:
    meters = Meters()
    meters.consumer_limit = 2
    for consumer in ("a", "b", "c", "a", "d"):
        meters.count_client("127.0.0.1", consumer, 0.0)
    assert meters.consumers == {"a": 2, "b": 1, "_other": 2}


def test_a_namespace_gives_the_metric_names_users_expect() -> None:
    meters = Meters()
    meters.route("orders").observe("POST", 201, 0.003, 120, 40, 10.0)
    meters.unrouted.observe("GET", 404, 0.0001, 0, 30, 10.0)
    meters.count_error(404, None)
    merged = merge([{"meters": meters.export(), "counters": {"access_log_dropped": 4}}], 10.0)
    text = prometheus_text(merged, "api_gateway").decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "api_gateway_requests",
        "api_gateway_request_duration_seconds",
        "api_gateway_request_size_bytes",
        "api_gateway_response_size_bytes",
        "api_gateway_upstream_latency_seconds",
        "api_gateway_errors",
        "api_gateway_rate_limited",
        "api_gateway_auth_failures",
        "api_gateway_retries",
        "api_gateway_circuit_state",
        "api_gateway_target_healthy",
        "api_gateway_connections_open",
        "api_gateway_requests_in_flight",
        "api_gateway_access_log_dropped",
    } <= names
    assert 'api_gateway_requests_total{method="POST",route="orders",status="201"} 1.0' in text
    assert 'api_gateway_errors_total{type="http_404"} 1.0' in text
    assert "api_gateway_access_log_dropped_total 4.0" in text
