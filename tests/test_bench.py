"""bench/run's pure parts: the order of each round, and the medians and ranges drawn from the rounds."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path
from types import ModuleType

import pytest

BENCH_RUN = Path(__file__).resolve().parent.parent / "bench" / "run"


def _load_bench_run() -> ModuleType:
    # bench/run is a script without .py; its dataclasses look their module up in sys.modules.
    loader = importlib.machinery.SourceFileLoader("bench_run", str(BENCH_RUN))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("bench_run", loader))
    sys.modules["bench_run"] = module
    loader.exec_module(module)
    return module


bench = _load_bench_run()


def _measured(target: str, rps: float, p99_ms: float = 1.0, non2xx: int = 0) -> object:
    kind = "apigate" if target.startswith("apigate ") else target
    result = bench.WrkResult(requests=1000, seconds=1.0, rps=rps, p50_ms=0.5, p99_ms=p99_ms, non2xx=non2xx)
    return bench.Measurement(target, kind, result=result)


def _summary(summaries: list, target: str) -> object:
    return next(s for s in summaries if s.target == target)


def _figures(spread: object) -> tuple[float, float, float, int]:
    return (spread.median, spread.min, spread.max, spread.rounds)


NAMES = ["nginx", "apigate plain", "apigate headers"]


def test_each_ratio_is_taken_within_its_round_then_summarised_as_median_and_range() -> None:
    rounds = [
        [
            _measured("nginx", 100, p99_ms=2.0),
            _measured("apigate plain", 72),
            _measured("apigate headers", 70),
        ],
        [_measured("apigate headers", 40), _measured("nginx", 60), _measured("apigate plain", 45)],
        [
            _measured("apigate plain", 63, p99_ms=3.0),
            _measured("apigate headers", 63),
            _measured("nginx", 90),
        ],
    ]
    summaries = bench.summarise(NAMES, rounds)

    plain = _summary(summaries, "apigate plain")
    # 0.72, 0.75 and 0.70 in their rounds; the medians' ratio (63 / 90 = 0.70) would hide the drift.
    assert _figures(plain.ratios["rps_vs_nginx"]) == pytest.approx((0.72, 0.70, 0.75, 3))
    assert _figures(plain.ratios["p99_vs_nginx"]) == pytest.approx((1.0, 0.5, 3.0, 3))
    assert _figures(plain.rps) == (63, 45, 72, 3)
    headers = _summary(summaries, "apigate headers")
    # Against each round's own plain: 70/72, 40/45, 63/63.
    assert _figures(headers.ratios["rps_vs_plain"]) == pytest.approx((70 / 72, 40 / 45, 1.0, 3))
    # nginx has no rps/plain: it is not an apigate scenario.
    assert _summary(summaries, "nginx").ratios["rps_vs_plain"] is None
    assert [s.target for s in summaries] == NAMES


def test_an_invalid_round_gives_no_ratio_and_is_counted() -> None:
    rounds = [
        [_measured("nginx", 100), _measured("apigate plain", 70), _measured("apigate headers", 63)],
        # plain answered mostly errors here: no plain ratio, and headers has no plain to divide by.
        [
            _measured("nginx", 100),
            _measured("apigate plain", 90, non2xx=900),
            _measured("apigate headers", 60),
        ],
        [
            _measured("nginx", 100),
            bench.Measurement("apigate plain", "apigate", failure="exited with code 1"),
            _measured("apigate headers", 60),
        ],
    ]
    summaries = bench.summarise(NAMES, rounds)

    plain = _summary(summaries, "apigate plain")
    assert _figures(plain.ratios["rps_vs_nginx"]) == pytest.approx((0.70, 0.70, 0.70, 1))
    assert plain.invalid_rounds == 2
    assert plain.errors == 900
    headers = _summary(summaries, "apigate headers")
    assert _figures(headers.ratios["rps_vs_plain"]) == pytest.approx((0.9, 0.9, 0.9, 1))
    assert headers.ratios["rps_vs_nginx"].rounds == 3
    assert headers.invalid_rounds == 0


def test_a_missing_p99_is_left_out_not_taken_as_zero() -> None:
    rounds = [
        [_measured("nginx", 100, p99_ms=2.0), _measured("apigate plain", 70, p99_ms=math.nan)],
        [_measured("nginx", 100, p99_ms=2.0), _measured("apigate plain", 70, p99_ms=3.0)],
    ]
    plain = _summary(bench.summarise(["nginx", "apigate plain"], rounds), "apigate plain")
    assert _figures(plain.p99_ms) == (3.0, 3.0, 3.0, 1)
    assert _figures(plain.ratios["p99_vs_nginx"]) == pytest.approx((1.5, 1.5, 1.5, 1))


@pytest.mark.parametrize("count", range(2, 9))
def test_a_full_cycle_of_rounds_balances_positions_and_predecessors(count: int) -> None:
    targets = [f"t{i}" for i in range(count)]
    cycle = count if count % 2 == 0 else 2 * count  # an odd square needs its mirror too
    rows = [bench.round_order(targets, index) for index in range(cycle)]

    assert all(sorted(row) == targets for row in rows)
    positions = Counter((target, row.index(target)) for row in rows for target in row)
    assert set(positions.values()) == {cycle // count}
    followers = Counter(pair for row in rows for pair in pairwise(row))
    assert len(followers) == count * (count - 1)
    assert set(followers.values()) == {cycle // count}


@pytest.mark.parametrize("count", range(3, 9))
def test_three_rounds_already_vary_what_each_target_follows(count: int) -> None:
    targets = list(range(count))
    rows = [bench.round_order(targets, index) for index in range(3)]
    for target in targets:
        before = {row[row.index(target) - 1] if row.index(target) else None for row in rows}
        assert len(before) > 1, (target, rows)


def test_one_round_keeps_upstream_nginx_plain_in_order() -> None:
    assert bench.round_order(["upstream", "nginx", "apigate plain"], 0) == [
        "upstream",
        "nginx",
        "apigate plain",
    ]


def test_rounds_option() -> None:
    assert bench.parse_args([]).rounds == 3
    assert bench.parse_args(["--quick"]).rounds == 1
    assert bench.parse_args(["--quick", "--rounds", "2"]).rounds == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--soak", "1000", "--rounds", "2"])


def test_a_spread_prints_its_range_only_over_several_rounds() -> None:
    assert bench.fmt_spread(bench.Spread(median=0.72, min=0.72, max=0.72, rounds=1)) == "0.72"
    assert bench.fmt_spread(bench.Spread(median=0.72, min=0.7, max=0.75, rounds=3)) == "0.72 (0.70-0.75)"
    assert bench.fmt_spread(None) == "-"


@pytest.mark.parametrize("name", sorted(bench.SCENARIOS))
def test_every_scenario_config_is_one_the_gateway_accepts(name: str) -> None:
    from apigate.config.loader import load_config

    scenario = bench.SCENARIOS[name]
    config = load_config(text=bench.apigate_config(scenario, 8080, 9090, 6390 if scenario.redis else None))
    assert config.routes[0].path == "/*"


def test_a_scenario_with_a_baseline_of_its_own_brings_it_and_is_divided_by_it() -> None:
    assert bench.parse_args(["--scenarios", "gzip-10k"]).scenarios == ["plain", "plain-10k", "gzip-10k"]
    rounds = [
        [
            _measured("nginx", 100),
            _measured("apigate plain", 80),
            _measured("apigate plain-10k", 50),
            _measured("apigate gzip-10k", 20),
        ]
    ]
    summaries = bench.summarise(["nginx", "apigate plain", "apigate plain-10k", "apigate gzip-10k"], rounds)
    # gzip-10k over plain-10k (the same 10 KB body), plain-10k over plain.
    assert _summary(summaries, "apigate gzip-10k").ratios["rps_vs_plain"].median == pytest.approx(0.4)
    assert _summary(summaries, "apigate plain-10k").ratios["rps_vs_plain"].median == pytest.approx(50 / 80)


def test_the_10k_body_is_json_of_exactly_10_kb() -> None:
    import json

    assert len(bench.JSON_10K.encode()) == 10 * 1024
    assert len(json.loads(bench.JSON_10K)["items"]) > 50
    assert bench.SCENARIOS["gzip-10k"].path == bench.SCENARIOS["plain-10k"].path == bench.JSON_10K_PATH
    framed = b"5\r\nhello\r\n6;x=1\r\n world\r\n0\r\n\r\n"
    assert bench.dechunk(framed) == b"hello world"
