"""Request events, live: real gateways (two workers), a listener on the admin listener's
/api/events through apigate.client, and a real Redis stream."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from apigate.client import EventsError, events, watch
from tests.support.errors_helpers import request, wait_until
from tests.support.gateway import GatewayProcess, free_port
from tests.support.upstream import UpstreamServer

TOKEN = "admin-token-for-events"


class Listener:
    """Collects the events of one /api/events stream in a thread."""

    def __init__(self, admin_url: str, **options: Any) -> None:
        self.events: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(admin_url, options), daemon=True)
        self.thread.start()

    def _run(self, admin_url: str, options: dict[str, Any]) -> None:
        try:
            for event in events(admin_url, TOKEN, **options):
                self.events.append(event)
        except BaseException as exc:
            self.error = exc

    def ids(self) -> set[str]:
        return {event["request_id"] for event in list(self.events)}


def start(
    tmp_path: Path, upstream: UpstreamServer, workers: int = 2, **events_config: Any
) -> tuple[GatewayProcess, str]:
    admin_port = free_port()
    config = {
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": TOKEN},
        "events": events_config,
        "routes": [{"name": "api", "path": "/api/*", "target": upstream.url, "strip_prefix": True}],
    }
    gateway = GatewayProcess(tmp_path, config, workers=workers).start()
    return gateway, f"http://127.0.0.1:{admin_port}"


def listening(gateway: GatewayProcess, listener: Listener) -> None:
    """Wait until events flow (the node has told every worker someone listens)."""
    probes = 0

    def flowing() -> bool:
        nonlocal probes
        probes += 1
        ids = [f"probe-{probes}-{n}" for n in range(4)]  # new connections: both workers take some
        for rid in ids:
            request(gateway.port, "GET", "/api/echo", headers=[("X-Request-ID", rid)])
        time.sleep(0.3)
        return set(ids) <= listener.ids()

    wait_until(flowing, timeout=15, interval=0, message="request events reach the listener")


@pytest.fixture
def gateway_and_listener(
    tmp_path: Path, upstream: UpstreamServer
) -> Iterator[tuple[GatewayProcess, Listener]]:
    gateway, admin_url = start(tmp_path, upstream)
    listener = Listener(admin_url)
    listening(gateway, listener)
    yield gateway, listener
    gateway.stop()


def test_every_request_of_both_workers_arrives_once_and_without_credentials(
    gateway_and_listener: tuple[GatewayProcess, Listener],
) -> None:
    gateway, listener = gateway_and_listener
    sent = {f"rid-{n}": 200 for n in range(30)} | {"rid-404": 404, "rid-500": 500}
    for rid, status in sent.items():
        path = (
            "/nowhere"
            if status == 404
            else "/api/status/500"
            if status == 500
            else "/api/echo?api_key=s3cret"
        )
        headers = [("X-Request-ID", rid), ("Authorization", "Bearer very-secret-token")]
        assert request(gateway.port, "GET", path, headers=headers).status == status
    wait_until(lambda: set(sent) <= listener.ids(), message="every event")
    seen = collections.Counter(e["request_id"] for e in listener.events if e["request_id"] in sent)
    assert set(seen.values()) == {1}
    by_id = {e["request_id"]: e for e in listener.events}
    ok = by_id["rid-0"]
    assert ok["type"] == "gateway.request.completed"
    assert (ok["method"], ok["path"], ok["route"], ok["status"]) == ("GET", "/api/echo", "api", 200)
    assert ok["latency_ms"] >= 0 and len(ok["trace_id"]) == 32 and ok["error"] is False
    assert (by_id["rid-404"]["route"], by_id["rid-404"]["status"]) == (None, 404)
    assert by_id["rid-500"]["error"] is True
    text = orjson.dumps(listener.events).decode()
    assert "s3cret" not in text and "very-secret-token" not in text


def test_a_wrong_token_is_refused(tmp_path: Path, upstream: UpstreamServer) -> None:
    gateway, admin_url = start(tmp_path, upstream, workers=1)
    try:
        with pytest.raises(EventsError) as refused:
            next(events(admin_url, "wrong"))
        assert refused.value.status == 403
        with pytest.raises(EventsError) as missing:
            next(events(admin_url, None))
        assert missing.value.status == 401
    finally:
        gateway.stop()


def test_the_cap_counts_what_it_holds_back(tmp_path: Path, upstream: UpstreamServer) -> None:
    gateway, admin_url = start(tmp_path, upstream, workers=1, max_per_second=3)
    try:
        listener = Listener(admin_url)

        def flowing() -> bool:
            request(gateway.port, "GET", "/api/echo")
            return bool(listener.events)

        wait_until(flowing, timeout=15, message="events reach the listener")
        before = len(listener.events)
        capped_before = orjson.loads(request(gateway.port, "GET", "/metrics").body)["counters"][
            "events_capped"
        ]
        for n in range(40):
            request(gateway.port, "GET", "/api/echo", headers=[("X-Request-ID", f"capped-{n}")])
        time.sleep(0.5)  # (a batch leaves the worker within 0.2 s)
        got = sum(1 for e in listener.events[before:] if e["request_id"].startswith("capped-"))
        capped = orjson.loads(request(gateway.port, "GET", "/metrics").body)["counters"]["events_capped"]
        assert got < 40
        # Held back: the tagged requests that made no event, and perhaps the first /metrics request
        # (it finished after its own answer was made).
        assert 40 - got <= capped - capped_before <= 40 - got + 1
    finally:
        gateway.stop()


def test_only_failed_requests_when_asked(tmp_path: Path, upstream: UpstreamServer) -> None:
    gateway, admin_url = start(tmp_path, upstream)
    try:
        everything = Listener(admin_url)
        listening(gateway, everything)
        failures = Listener(admin_url, errors=True)
        wait_until(lambda: request(gateway.port, "GET", "/api/status/502").status == 502 and failures.events)
        request(gateway.port, "GET", "/api/echo", headers=[("X-Request-ID", "fine")])
        request(gateway.port, "GET", "/api/status/503", headers=[("X-Request-ID", "broken")])
        wait_until(lambda: {"fine", "broken"} <= everything.ids())
        time.sleep(0.3)
        assert "broken" in failures.ids() and "fine" not in failures.ids()
        assert all(event["error"] for event in failures.events)
    finally:
        gateway.stop()


def test_sampling_sends_that_share(tmp_path: Path, upstream: UpstreamServer) -> None:
    gateway, admin_url = start(tmp_path, upstream, workers=1, sample=0.25)
    try:
        listener = Listener(admin_url)
        wait_until(lambda: request(gateway.port, "GET", "/api/echo").status == 200 and listener.events)
        time.sleep(0.3)
        with_probe = len(listener.events)
        for n in range(40):
            request(gateway.port, "GET", "/api/echo", headers=[("X-Request-ID", f"sampled-{n}")])
        wait_until(lambda: len(listener.events) >= with_probe + 10)
        time.sleep(0.3)
        assert sum(1 for e in listener.events if e["request_id"].startswith("sampled-")) == 10
    finally:
        gateway.stop()


def test_watch_calls_back_as_the_documented_monitoring_does(tmp_path: Path, upstream: UpstreamServer) -> None:
    gateway, admin_url = start(tmp_path, upstream, workers=1)
    seen: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []

    async def on_request(event: dict[str, Any]) -> None:
        seen.append(event)

    async def main() -> None:
        watching = asyncio.ensure_future(
            watch(admin_url, TOKEN, on_request=on_request, on_error=errors.append)
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (
            any(e["status"] == 500 for e in errors) and any(e["status"] == 200 for e in seen)
        ):
            await asyncio.to_thread(request, gateway.port, "GET", "/api/echo")
            await asyncio.to_thread(request, gateway.port, "GET", "/api/status/500")
            await asyncio.sleep(0.3)
        gateway.stop()  # the stream ends with the gateway, and watch returns
        await asyncio.wait_for(watching, 10)

    try:
        asyncio.run(main())
    finally:
        gateway.stop()
    assert any(e["status"] == 200 for e in seen), seen
    assert errors and all(e["error"] for e in errors)
    assert {e["request_id"] for e in errors} <= {e["request_id"] for e in seen}


def test_events_go_to_a_redis_stream_trimmed_to_its_length(
    tmp_path: Path, upstream: UpstreamServer, redis_url: str
) -> None:
    stream = {"url": redis_url, "stream": "gw:events", "max_length": 50}
    # One worker: its batches reach the stream in order, so the newest entry is the last request.
    gateway, _admin_url = start(tmp_path, upstream, workers=1, redis=stream, max_per_second=100_000)
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(
            lambda: request(gateway.port, "GET", "/api/echo").status == 200 and client.xlen("gw:events") > 0,
            timeout=15,
        )
        for n in range(400):
            request(gateway.port, "GET", "/api/echo", headers=[("X-Request-ID", f"stream-{n}")])

        def last_arrived() -> bool:
            entries = client.xrevrange("gw:events", count=1)
            return orjson.loads(entries[0][1][b"data"])["request_id"] == "stream-399"

        wait_until(last_arrived, message="the last event in the stream")
        # MAXLEN ~ trims whole nodes (100 entries each by default): never far past the length.
        assert 50 <= client.xlen("gw:events") <= 150
        _id, fields = client.xrevrange("gw:events", count=1)[0]
        assert fields[b"type"] == b"gateway.request.completed"
    finally:
        gateway.stop()
        client.close()


@pytest.mark.parametrize(
    ("section", "words"),
    [
        (
            {"redis": {"url": "http://127.0.0.1:6379"}},
            "events.redis.url: must be a redis:// or rediss:// URL",
        ),
        ({"sample": 1.5}, "events.sample"),
        ({"max_per_second": 0}, "events.max_per_second"),
        ({"stream": "x"}, "events.stream"),
    ],
)
def test_bad_events_settings_name_the_field(section: dict[str, Any], words: str) -> None:
    from apigate.config.loader import ConfigError, load_config

    with pytest.raises(ConfigError) as refused:
        load_config(text=orjson.dumps({"events": section, "routes": []}).decode())
    assert words in str(refused.value)
