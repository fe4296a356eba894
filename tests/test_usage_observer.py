"""The usage observer in one process: the hook buckets finished exchanges by minute (fixed clock) and
identity, a flush writes them to a real SQLite store in one batch, a failed write keeps them for the
next, at most ``max_pending_keys`` buckets wait (the rest are dropped and counted), and the config
section's errors name their field."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from apigate.config.loader import ConfigError, load_config
from apigate.config.models import GatewayConfig
from apigate.observe.usage import UsageObserver
from apigate.services import Services
from apigate.store import Consumer
from apigate.store.roles.usage import MINUTE, UsageBucket, UsageQuery
from tests.support.state import Run

T0 = 1_775_000_040 + 40  # 40 s into a minute


def config(tmp_path: Path, **usage: Any) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {"store": {"url": f"sqlite:///{tmp_path / 'usage.db'}"}, "usage": {"enabled": True, **usage}}
    )


def exchange(
    status: int = 200,
    consumer: Any = None,
    route: str | None = "orders",
    key_id: str | None = None,
    **more: Any,
) -> Any:
    """What the hook reads of an engine Exchange."""
    return SimpleNamespace(
        consumer=consumer,
        tenant=more.get("tenant"),
        state={"key_id": key_id} if key_id else None,
        route=SimpleNamespace(name=route) if route else None,
        response_status=status,
        t_start=10.0,
        t_end=10.0 + more.get("seconds", 0.004),
        bytes_in=more.get("bytes_in", 0),
        bytes_out=more.get("bytes_out", 0),
    )


class FailingFirst:
    """A usage store that refuses its first ``failures`` writes, then keeps what it is given."""

    def __init__(self, failures: int, meanwhile: Callable[[], None] = lambda: None) -> None:
        self.failures = failures
        self.meanwhile = meanwhile  # what happens while a write is under way
        self.written: list[UsageBucket] = []

    async def add_usage(self, buckets: Sequence[UsageBucket]) -> None:
        self.meanwhile()
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the store is away")
        self.written.extend(buckets)


def test_disabled_usage_has_no_hook(tmp_path: Path) -> None:
    assert UsageObserver().apply(GatewayConfig()) is None
    assert UsageObserver().apply(config(tmp_path)) is not None


def test_the_hook_buckets_by_minute_and_identity_and_a_flush_writes_them(tmp_path: Path, run: Run) -> None:
    now = [float(T0)]
    observer = UsageObserver(clock=lambda: now[0])
    settings = config(tmp_path)
    hook = observer.apply(settings)
    assert hook is not None
    alice = Consumer("alice", tenant="acme")
    hook(exchange(200, alice, key_id="k1", tenant="acme", bytes_in=10, bytes_out=100, seconds=0.002))
    hook(exchange(404, alice, key_id="k1", tenant="acme", bytes_out=20, seconds=0.006))
    hook(exchange(503, "token-subject", route=None))  # a JWT's subject; no route matched
    now[0] += 30  # the next minute
    hook(exchange(200, alice, key_id="k1", tenant="acme"))
    services = Services()

    async def scenario() -> list[Any]:
        await observer.start(settings, services)
        try:
            assert await observer.flush()
            assert observer.pending == {}
            store = await services.store_for(settings)
            return await store.query_usage(
                UsageQuery(0, 2**40, ("consumer", "key", "tenant", "route"), MINUTE)
            )
        finally:
            await observer.stop()
            await services.stop()

    rows = run(scenario())
    minute = T0 - T0 % 60
    assert [(r.start, r.groups, r.counts.requests) for r in rows] == [
        (minute, {"consumer": "alice", "key": "k1", "tenant": "acme", "route": "orders"}, 2),
        (minute, {"consumer": "token-subject", "key": None, "tenant": None, "route": None}, 1),
        (minute + 60, {"consumer": "alice", "key": "k1", "tenant": "acme", "route": "orders"}, 1),
    ]
    first = rows[0].counts
    assert (first.client_errors, first.server_errors, first.bytes_in, first.bytes_out) == (1, 0, 10, 120)
    assert first.latency_sum_ms == pytest.approx(8.0) and first.latency_max_ms == pytest.approx(6.0)
    assert (rows[1].counts.client_errors, rows[1].counts.server_errors) == (0, 1)


class Observing:
    """An observer on a fixed clock, started with ``store`` as its store."""

    def __init__(self, tmp_path: Path, store: FailingFirst, **usage: Any) -> None:
        self.observer = UsageObserver(clock=lambda: float(T0))
        self.settings = config(tmp_path, **usage)
        hook = self.observer.apply(self.settings)
        assert hook is not None
        self.hook = hook
        self.store = store

    async def start(self) -> UsageObserver:
        async def store_for(_: GatewayConfig) -> FailingFirst:
            return self.store

        await self.observer.start(self.settings, SimpleNamespace(store_for=store_for))  # type: ignore[arg-type]
        return self.observer


def test_a_failed_write_keeps_the_buckets_and_adds_what_came_meanwhile(tmp_path: Path, run: Run) -> None:
    watching = Observing(tmp_path, FailingFirst(failures=2))
    hook = watching.hook

    async def scenario() -> None:
        observer = await watching.start()
        try:
            hook(exchange(consumer="bob"))
            assert not await observer.flush()
            hook(exchange(consumer="bob", seconds=0.05))
            hook(exchange(consumer="carol"))
            assert not await observer.flush()
            assert await observer.flush()
        finally:
            await observer.stop()

    run(scenario())
    written = {b.consumer: b.counts for b in watching.store.written}
    assert written["bob"].requests == 2 and written["bob"].latency_max_ms == pytest.approx(50.0)
    assert written["carol"].requests == 1
    assert watching.observer.pending == {} and watching.observer.dropped == 0


def test_pending_buckets_are_capped_and_what_does_not_fit_is_counted(tmp_path: Path, run: Run) -> None:
    store = FailingFirst(failures=1)
    watching = Observing(tmp_path, store, max_pending_keys=3)
    hook = watching.hook
    # "e" arrives while the first write (of a, b, c) is under way, and that write fails.
    store.meanwhile = lambda: hook(exchange(consumer="e")) if store.failures else None

    async def scenario() -> None:
        observer = await watching.start()
        try:
            for name in ("a", "b", "c", "d", "a"):
                hook(exchange(consumer=name))
            assert observer.dropped == 1  # "d": a fourth bucket
            assert not await observer.flush()
            assert await observer.flush() is True
        finally:
            await observer.stop()

    run(scenario())
    assert {b.consumer: b.counts.requests for b in store.written} == {"e": 1, "a": 2, "b": 1}
    assert watching.observer.dropped == 2  # "d", and "c": put back after "e" and the others took the places


def test_stop_writes_what_is_pending(tmp_path: Path, run: Run) -> None:
    watching = Observing(tmp_path, FailingFirst(failures=0), flush_interval="1h")

    async def scenario() -> None:
        observer = await watching.start()
        watching.hook(exchange(consumer="late"))
        await asyncio.wait_for(observer.stop(), 5)

    run(scenario())
    assert [b.consumer for b in watching.store.written] == ["late"]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{rollup: {hourly_after: 3d, daily_after: 2d}}", "usage.rollup.daily_after: must be longer than"),
        ("{retention: 10d}", "usage.retention: must be longer than rollup.daily_after"),
        ("{flush_interval: 0s}", "usage.flush_interval: "),
        ("{max_pending_keys: 0}", "usage.max_pending_keys: "),
        ("{enabled: maybe}", "usage.enabled: "),
        ("{sample: 1}", "usage.sample: "),
    ],
)
def test_config_errors_name_the_field(section: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(text=f"usage: {section}\n")
