"""Active health checks against real servers on 127.0.0.1: a target whose answer the test changes
(tests/support/health_target.py) and the shared test upstream, probed every 50-100 ms."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import orjson
import pytest

from apigate.health import ActiveChecker, CheckSettings, ProbeTarget, TargetHealth
from apigate.health.active import next_slot
from tests.support.health_target import HealthTarget
from tests.support.state import Run, until
from tests.support.upstream import UpstreamServer

FAST = CheckSettings(interval=0.05, timeout=0.2, healthy_threshold=2, unhealthy_threshold=3)


class Changes:
    """An on_change that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, TargetHealth]] = []

    def __call__(self, key: str, health: TargetHealth) -> None:
        self.calls.append((key, health))

    def of(self, key: str) -> list[TargetHealth]:
        return [health for called, health in self.calls if called == key]


@asynccontextmanager
async def checking(
    targets: list[ProbeTarget], on_change: Callable[[str, TargetHealth], None]
) -> AsyncIterator[ActiveChecker]:
    checker = ActiveChecker(on_change)
    checker.set_targets(targets)
    checker.start()
    try:
        yield checker
    finally:
        await checker.stop()


@pytest.fixture
def make_target() -> Iterator[Callable[[], HealthTarget]]:
    started: list[HealthTarget] = []

    def make() -> HealthTarget:
        target = HealthTarget().start()
        started.append(target)
        return target

    yield make
    for target in started:
        target.stop()


def transitions(caplog: pytest.LogCaptureFixture, key: str) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "apigate" and record.getMessage().startswith(f"upstream target {key} is ")
    ]


# -- transitions -----------------------------------------------------------------------------------
def _fail(target: HealthTarget, how: str) -> None:
    if how == "status 500":
        target.status = 500
    elif how == "refused":
        target.stop_listening()
    elif how == "timeout":
        target.behaviour = "hang"
    else:
        target.behaviour = "reset"


def _recover(target: HealthTarget, how: str) -> None:
    target.status, target.behaviour = 200, "answer"
    if how == "refused":
        target.listen_again()


FAILURES = {
    "status 500": (500, "status 500 not expected"),
    "refused": (None, "connect refused"),
    "timeout": (None, "timeout after 0.2s"),
    "reset": (None, "the connection closed before a response arrived"),
}


@pytest.mark.parametrize("how", list(FAILURES))
def test_unhealthy_after_exactly_the_threshold_then_healthy_again(
    make_target: Callable[[], HealthTarget], run: Run, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    caplog.set_level(logging.INFO, logger="apigate")
    target = make_target()
    changes = Changes()
    status, error = FAILURES[how]

    # Only the hanging case waits for the short timeout; the others get time to spare on a busy
    # machine, so a slow answer is never mistaken for the failure under test.
    settings = FAST if how == "timeout" else replace(FAST, timeout=2.0)

    async def main() -> None:
        async with checking([ProbeTarget("users/a", target.url, settings)], changes) as checker:
            await until(lambda: checker.status()["users/a"].successes >= 1)
            health = checker.status()["users/a"]
            assert health.healthy and health.last_status == 200 and health.last_error is None
            assert health.changed_at is None

            _fail(target, how)
            await until(lambda: len(changes.calls) == 1)
            key, down = changes.calls[0]
            # Turned at the third failure in a row: not before (failures would be 1 or 2), and
            # on_change saw the state of that very probe.
            assert key == "users/a"
            assert (down.healthy, down.failures, down.successes) == (False, 3, 0)
            assert (down.last_status, down.last_error) == (status, error)
            assert down.changed_at == down.last_checked
            assert down.last_latency is not None and down.last_latency >= 0
            assert orjson.loads(orjson.dumps(down.describe())) == {
                "healthy": False,
                "last_status": status,
                "last_error": error,
                "last_latency": down.last_latency,
                "last_checked": down.last_checked,
                "changed_at": down.changed_at,
                "successes": 0,
                "failures": 3,
            }

            _recover(target, how)
            await until(lambda: len(changes.calls) == 2)
            up = changes.calls[1][1]
            assert (up.healthy, up.successes, up.failures) == (True, 2, 0)
            assert (up.last_status, up.last_error) == (200, None)
            assert up.changed_at is not None and down.changed_at is not None
            assert up.changed_at > down.changed_at
            await until(lambda: checker.status()["users/a"].successes >= 5)

        assert len(changes.calls) == 2  # more good probes, no more transitions
        logged = transitions(caplog, "users/a")
        assert [record.levelname for record in logged] == ["WARNING", "INFO"]
        assert "unhealthy" in logged[0].getMessage() and error in logged[0].getMessage()
        assert "healthy again" in logged[1].getMessage()

    run(main())


def test_expected_statuses_are_honoured(make_target: Callable[[], HealthTarget], run: Run) -> None:
    answers = {"no-content": 204, "ok": 200, "redirect": 302, "missing": 404}
    servers = {key: make_target() for key in answers}
    for key, server in servers.items():
        server.status = answers[key]
    only_204 = replace(FAST, unhealthy_threshold=1, expected_statuses=frozenset({204}))
    targets = [
        ProbeTarget("no-content", servers["no-content"].url, only_204),
        ProbeTarget("ok", servers["ok"].url, only_204),
        ProbeTarget("redirect", servers["redirect"].url, replace(FAST, unhealthy_threshold=1)),
        ProbeTarget("missing", servers["missing"].url, replace(FAST, unhealthy_threshold=1)),
    ]
    changes = Changes()

    async def main() -> None:
        async with checking(targets, changes) as checker:
            await until(lambda: all(h.successes + h.failures >= 3 for h in checker.status().values()))
            health = checker.status()
        assert {key: h.healthy for key, h in health.items()} == {
            "no-content": True,
            "ok": False,  # 200 is not the 204 it expects
            "redirect": True,  # 2xx and 3xx by default
            "missing": False,
        }
        assert health["ok"].last_error == "status 200 not expected"
        assert health["missing"].last_error == "status 404 not expected"
        assert health["no-content"].last_status == 204 and health["no-content"].last_error is None
        assert sorted(key for key, _ in changes.calls) == ["missing", "ok"]

    run(main())


def test_probe_requests_carry_the_settings(upstream: UpstreamServer, run: Run) -> None:
    named = CheckSettings(
        interval=0.05,
        path="/ready?deep=1",
        host="api.internal:8443",
        method="HEAD",
        headers=(("X-Probe", "apigate"), ("Authorization", "Bearer t")),
    )
    targets = [
        ProbeTarget("named", upstream.url, named),
        ProbeTarget("default", upstream.url + "/base", replace(FAST, path="/health")),
    ]

    def seen(path: str) -> list[Any]:
        return [request for request in upstream.requests if request.path == path]

    async def main() -> None:
        async with checking(targets, Changes()) as checker:
            await until(lambda: len(seen("/ready")) >= 2 and len(seen("/health")) >= 2)
            assert all(h.healthy and h.last_status == 200 for h in checker.status().values())

    run(main())
    ready, health = seen("/ready")[0], seen("/health")[0]
    assert (ready.method, ready.query) == ("HEAD", "deep=1")
    assert ready.header("host") == "api.internal:8443"
    assert ready.header("x-probe") == "apigate" and ready.header("authorization") == "Bearer t"
    # The target's own path is not used, and its host:port is the default Host.
    assert health.method == "GET" and health.header("host") == f"127.0.0.1:{upstream.port}"
    # No probe connection is kept alive: each asks to close and comes on a connection of its own.
    assert all(request.header("connection") == "close" for request in upstream.requests)
    assert len({request.connection_id for request in upstream.requests}) == len(upstream.requests)


# -- targets come and go -------------------------------------------------------------------------------
def test_set_targets_adds_and_removes_without_disturbing_the_others(
    make_target: Callable[[], HealthTarget], run: Run
) -> None:
    failing, removed, added = make_target(), make_target(), make_target()
    failing.status = 500
    settings = replace(FAST, unhealthy_threshold=2)
    changes = Changes()

    async def main() -> None:
        checker = ActiveChecker(changes)
        checker.set_targets([ProbeTarget("failing", failing.url, settings), ProbeTarget("gone", removed.url)])
        checker.start()
        try:
            await until(lambda: not checker.status()["failing"].healthy)
            schedule = checker._tasks["failing"]
            failures = checker.status()["failing"].failures

            # An equal target (a new object) keeps its health and its schedule.
            same = ProbeTarget("failing", failing.url, replace(FAST, unhealthy_threshold=2))
            checker.set_targets([same, ProbeTarget("new", added.url, settings)])
            assert sorted(checker.status()) == ["failing", "new"]
            assert checker._tasks["failing"] is schedule
            assert checker.status()["new"] == TargetHealth()  # starts healthy, unprobed
            assert not checker.status()["failing"].healthy
            assert checker.status()["failing"].failures >= failures

            await until(lambda: checker.status()["new"].successes >= 2)
            probes_of_removed = len(removed.requests)
            await until(lambda: checker.status()["new"].successes >= 5)
            assert len(removed.requests) == probes_of_removed  # forgotten: no more probes
            assert checker.status()["failing"].failures > failures  # still counting

            # Changed settings restart the schedule (the new path is probed) and keep the health.
            failures = checker.status()["failing"].failures
            moved = ProbeTarget("failing", failing.url, replace(settings, path="/moved"))
            checker.set_targets([moved, ProbeTarget("new", added.url, settings)])
            assert checker._tasks["failing"] is not schedule
            await until(lambda: len(failing.paths("/moved")) >= 2)
            health = checker.status()["failing"]
            assert not health.healthy and health.failures > failures
        finally:
            await checker.stop()
        assert [key for key, _ in changes.calls] == ["failing"]  # one transition in all

    run(main())


def test_set_targets_refuses_duplicates_and_other_objects() -> None:
    checker = ActiveChecker(Changes())
    twice = [ProbeTarget("a", "http://127.0.0.1:1"), ProbeTarget("a", "http://127.0.0.1:2")]
    with pytest.raises(ValueError, match=r"targets\[1\]: the key 'a' is listed twice"):
        checker.set_targets(twice)
    with pytest.raises(TypeError, match=r"targets\[0\] must be a ProbeTarget"):
        checker.set_targets(["http://127.0.0.1:1"])  # type: ignore[list-item]
    assert checker.status() == {}
    with pytest.raises(RuntimeError, match="running event loop"):
        checker.start()


# -- scheduling ----------------------------------------------------------------------------------------
def test_first_probes_are_spread_over_the_first_interval(
    make_target: Callable[[], HealthTarget], run: Run
) -> None:
    target = make_target()
    interval = 0.5
    settings = replace(FAST, interval=interval)
    paths = [f"/t{i}" for i in range(8)]
    targets = [ProbeTarget(path, target.url, replace(settings, path=path)) for path in paths]

    async def main() -> float:
        started = time.monotonic()
        async with checking(targets, Changes()):
            await until(lambda: all(target.paths(path) for path in paths))
        return started

    started = run(main())
    first = [target.paths(path)[0].arrived - started for path in paths]
    assert max(first) < interval + 0.25  # within the first interval (and some slack for a busy host)
    # Random offsets: eight targets all probed within 50 ms of each other would be ~1e-6 likely.
    assert max(first) - min(first) > 0.05


def test_never_more_than_one_probe_in_flight_per_target(
    make_target: Callable[[], HealthTarget], run: Run
) -> None:
    target = make_target()
    target.behaviour = "hang"
    slow = replace(FAST, interval=0.1, timeout=0.15)  # each probe outlasts its interval
    targets = [ProbeTarget(path, target.url, replace(slow, path=path)) for path in ("/a", "/b")]

    async def main() -> dict[str, TargetHealth]:
        async with checking(targets, Changes()) as checker:
            await until(lambda: len(target.paths("/a")) >= 3 and len(target.paths("/b")) >= 3)
            return checker.status()

    health = run(main())
    assert target.most_in_flight["/a"] == 1 and target.most_in_flight["/b"] == 1
    assert health["/a"].last_error == "timeout after 0.15s"


def test_stop_abandons_probes_in_flight(make_target: Callable[[], HealthTarget], run: Run) -> None:
    target = make_target()
    target.behaviour = "hang"

    async def main() -> None:
        checker = ActiveChecker(Changes())
        checker.set_targets([ProbeTarget("t", target.url, replace(FAST, timeout=30.0))])
        checker.start()
        await until(lambda: target.in_flight["/health"] == 1)
        started = time.monotonic()
        await checker.stop()
        assert time.monotonic() - started < 1.0  # not the probe's 30 s timeout
        await until(lambda: target.in_flight["/health"] == 0)  # its connection closed
        assert checker.status()["t"].last_checked is None  # the abandoned probe is not counted
        assert not checker.running

        target.behaviour = "answer"
        checker.start()  # resumes with the same targets
        try:
            await until(lambda: checker.status()["t"].successes >= 1)
        finally:
            await checker.stop()

    run(main())


def test_probes_overrunning_their_interval_skip_the_slots_they_missed() -> None:
    assert next_slot(10.0, 0.5, 10.2) == 10.5  # on time: the next slot
    assert next_slot(10.0, 0.5, 11.2) == 11.5  # overran two slots: not 10.5, 11.0 at once
    assert next_slot(10.0, 0.5, 11.0) == 11.5  # on a slot's edge: the one after it
    assert next_slot(10.0, 0.5, 9.0) == 10.5  # a clock that went back: never before the next slot


def test_an_unexpected_error_is_logged_and_checks_go_on(
    make_target: Callable[[], HealthTarget], run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    target = make_target()
    calls = 0

    def wall() -> float:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("clock unavailable")
        return time.time()

    async def main() -> None:
        checker = ActiveChecker(Changes(), wall=wall)
        checker.set_targets([ProbeTarget("t", target.url, FAST)])
        checker.start()
        try:
            await until(lambda: checker.status()["t"].successes >= 2)
        finally:
            await checker.stop()

    run(main())
    errors = [r for r in caplog.records if r.exc_info and str(r.exc_info[1]) == "clock unavailable"]
    assert len(errors) == 1 and "health check of t failed unexpectedly" in errors[0].getMessage()


# -- callers' mistakes -----------------------------------------------------------------------------------
def test_a_failing_on_change_is_logged_and_checks_go_on(
    make_target: Callable[[], HealthTarget], run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    target = make_target()
    target.status = 503
    seen: list[bool] = []

    def broken(key: str, health: TargetHealth) -> None:
        seen.append(health.healthy)
        raise RuntimeError("listener bug")

    settings = replace(FAST, healthy_threshold=1, unhealthy_threshold=1)

    async def main() -> None:
        async with checking([ProbeTarget("t", target.url, settings)], broken):
            await until(lambda: seen == [False])
            target.status = 200
            await until(lambda: seen == [False, True])

    run(main())
    failures = [r for r in caplog.records if r.exc_info and str(r.exc_info[1]) == "listener bug"]
    assert len(failures) == 2
    assert all("on_change failed for the health of t" in r.getMessage() for r in failures)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"path": "health"}, "path must be"),
        ({"path": "/a b"}, "path must not"),
        ({"path": "/a#b"}, "path must not"),
        ({"path": "/é"}, "path must be"),
        ({"interval": 0}, "interval must be at least"),
        ({"interval": -1.0}, "interval must be at least"),
        ({"interval": float("nan")}, "interval must be a number"),
        ({"interval": "10s"}, "interval must be a number"),
        ({"timeout": 0}, "timeout must be above 0"),
        ({"timeout": True}, "timeout must be a number"),
        ({"healthy_threshold": 0}, "healthy_threshold must be"),
        ({"unhealthy_threshold": 1.5}, "unhealthy_threshold must be"),
        ({"expected_statuses": frozenset()}, "expected_statuses must be"),
        ({"expected_statuses": frozenset({200, 600})}, "expected_statuses must be"),
        ({"expected_statuses": "200"}, "expected_statuses must be"),
        ({"host": "a b"}, "host must be"),
        ({"host": "example.com:70000"}, "host must be"),
        ({"host": ""}, "host must be"),
        ({"method": "POST"}, "method must be GET or HEAD"),
        ({"headers": (("X-A", "1"), ("Bad Name", "x"))}, r"headers\[1\]: the name"),
        ({"headers": (("X-A", "a\r\nInjected: 1"),)}, r"headers\[0\]: the value of X-A"),
        ({"headers": (("Host", "x"),)}, r"headers\[0\]: set the Host header with the host setting"),
        ({"headers": (("Connection", "keep-alive"),)}, r"headers\[0\]: Connection is set"),
        ({"headers": ("X-A",)}, r"headers\[0\] must be a \(name, value\) pair"),
        ({"headers": "X-A: 1"}, "headers must be"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        CheckSettings(**fields)


def test_settings_are_normalised() -> None:
    settings = CheckSettings(
        interval=1, expected_statuses=[204, 200], headers=[["X-A", "1"]], host="[::1]:8080"
    )  # type: ignore[arg-type]
    assert settings.interval == 1.0 and isinstance(settings.interval, float)
    assert settings.expected_statuses == frozenset({200, 204})
    assert settings.headers == (("X-A", "1"),)
    assert settings == CheckSettings(
        interval=1.0, expected_statuses=frozenset({200, 204}), headers=(("X-A", "1"),), host="[::1]:8080"
    )
    assert CheckSettings(headers={"X-A": "1"}).headers == (("X-A", "1"),)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"key": "", "url": "http://127.0.0.1:8080"}, "key must be"),
        ({"key": "k", "url": "ftp://127.0.0.1"}, "url must be an http"),
        ({"key": "k", "url": "http://"}, "url must be an http"),
        ({"key": "k", "url": "http://[::1"}, "url must be an http"),
        ({"key": "k", "url": "http://127.0.0.1:99999"}, "url has an invalid port"),
        ({"key": "k", "url": "http://user:secret@127.0.0.1"}, "url must not carry credentials"),
        ({"key": "k", "url": "http://127.0.0.1/?a=1"}, "url must not carry a query"),
        ({"key": "k", "url": "http://127.0.0.1", "settings": {"path": "/"}}, "settings must be"),
    ],
)
def test_bad_targets_are_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}") as caught:
        ProbeTarget(**fields)
    assert "secret" not in str(caught.value)


def test_the_probe_goes_to_the_targets_origin() -> None:
    target = ProbeTarget("k", "HTTP://[::1]:8080/base/path", CheckSettings(path="/livez?x=1"))
    assert target.probe_url == "http://[::1]:8080/livez?x=1"
