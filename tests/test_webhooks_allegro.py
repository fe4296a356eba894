"""The Allegro order-events poller: real gateway processes poll a local imitation of Allegro's
endpoints (tests/support/allegro_server.py) and deliver each event to a real handler, once.

The handler records ``webhook-id`` and the attempt number of each delivery it accepts; "no event
delivered as new twice" means no id arrives twice as attempt 1.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from apigate.store import Store, open_store
from apigate.store.roles.webhooks import WebhookEventQuery
from apigate.webhooks.pollers import PolledEvent
from apigate.webhooks.pollers.allegro import REFRESH_MARGIN, AllegroPoller
from apigate.webhooks.pollers.config import AllegroPollConfig
from tests.support.allegro_server import CLIENT_ID, CLIENT_SECRET, FIRST_REFRESH_TOKEN, AllegroServer
from tests.support.gateway import GatewayProcess
from tests.support.pg import fresh_database
from tests.support.webhook_handler import Delivery, WebhookHandler
from tests.support.webhook_sender import Sender

SOURCE = "allegro-orders"
RETRIES = {"schedule": [0] + ["200ms"] * 20, "jitter": 0}


@pytest.fixture
def allegro() -> Iterator[AllegroServer]:
    server = AllegroServer().start()
    yield server
    server.stop()


@pytest.fixture
def handler() -> Iterator[WebhookHandler]:
    made = WebhookHandler().start()
    yield made
    made.stop()


def poll_config(allegro: AllegroServer, **extra: object) -> dict:
    return {
        "type": "allegro",
        "api_url": allegro.url,
        "token_url": f"{allegro.url}/auth/oauth/token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": FIRST_REFRESH_TOKEN,
        "interval": "200ms",
        "timeout": "1s",  # the lease (interval + 4 timeouts + 5 s) then lapses ~9 s after a kill
        **extra,
    }


def gateway_config(
    store_url: str,
    allegro: AllegroServer,
    handler: WebhookHandler,
    destinations: list | None = None,
    **poll: object,
) -> dict:
    return {
        "store": {"url": store_url},
        "webhooks": {
            "poll_interval": "100ms",
            "sources": {
                SOURCE: {"poll": poll_config(allegro, **poll), "destinations": destinations or ["handler"]}
            },
            "destinations": {"handler": {"url": handler.url, "timeout": "2s", "retry": RETRIES}},
        },
    }


def wait_until_polling(allegro: AllegroServer, limit: float = 15.0) -> None:
    """Until the poller has read the journal once: its start point is fixed from then on."""
    deadline = time.monotonic() + limit
    while not allegro.event_queries:
        assert time.monotonic() < deadline, f"no poll of /order/events within {limit}s"
        time.sleep(0.02)


def wait_for_ids(handler: WebhookHandler, ids: list[str], limit: float = 30.0) -> list[Delivery]:
    return handler.wait_for(lambda seen: set(ids) <= {d.webhook_id for d in seen}, limit)


def assert_none_delivered_as_new_twice(deliveries: list[Delivery]) -> None:
    as_new = Counter(d.webhook_id for d in deliveries if d.attempt == 1)
    assert max(as_new.values(), default=1) == 1, as_new.most_common(3)


def kill(gateway: GatewayProcess) -> None:
    gateway.signal(signal.SIGKILL)
    assert gateway.proc is not None
    gateway.proc.wait(10)


def stored_states(store_url: str, event_ids: list[str]) -> dict[str, str]:
    async def read() -> dict[str, str]:
        store = open_store(store_url)
        await store.open()
        try:
            events = await store.list_webhook_events(WebhookEventQuery(source=SOURCE, limit=None))
        finally:
            await store.close()
        return {e.event_id: e.state for e in events if e.event_id in event_ids}

    return asyncio.run(read())


def test_events_arrive_once_each_through_refresh_throttling_and_garbage(
    start_gateway: Callable[..., GatewayProcess],
    allegro: AllegroServer,
    handler: WebhookHandler,
    tmp_path: Path,
) -> None:
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    before_setup = allegro.add_events(3)  # in the journal before the source existed: not delivered
    allegro.faults.append("401")  # the first token is refused once: refreshed, and the page read again
    config = gateway_config(
        store_url,
        allegro,
        handler,
        destinations=[{"name": "handler", "event_types": ["READY_FOR_PROCESSING"]}],
        page_size=50,
        event_types=["READY_FOR_PROCESSING", "BUYER_CANCELLED"],
    )
    gateway = start_gateway(config)
    wait_until_polling(allegro)

    first = allegro.add_events(120)
    wait_for_ids(handler, first)
    throttled_at = len(allegro.event_queries)
    allegro.faults.extend(["429", "garbage"])
    cancelled = allegro.add_events(5, "BUYER_CANCELLED")  # polled and stored; the handler wants none
    allegro.add_events(5, "FILLED_IN")  # not among the polled types
    second = allegro.add_events(130)
    deliveries = wait_for_ids(handler, second)

    delivered = [d.webhook_id for d in deliveries]
    assert sorted(delivered) == sorted(first + second), "each wanted event exactly once, nothing else"
    assert not set(delivered) & set(before_setup)
    assert allegro.stats_calls == 1
    assert allegro.refreshes == 2, "one refresh to start, one after the 401"
    # Retry-After: 1 was honoured (the interval and the back-off after garbage are 200 ms).
    after_throttle = allegro.event_queries[throttled_at:]
    times = [at for at, _ in after_throttle]
    assert times[1] - times[0] >= 0.9
    assert all(query["type"] == ["READY_FOR_PROCESSING", "BUYER_CANCELLED"] for _, query in after_throttle)
    assert {query["limit"][0] for _, query in after_throttle} == {"50"}

    sample = deliveries[0]
    event = orjson.loads(sample.body)
    assert event["id"] == sample.webhook_id and event["type"] == "READY_FOR_PROCESSING"
    assert set(event) == {"id", "occurredAt", "type", "order"}
    assert sample.headers["content-type"] == "application/json"
    assert sample.headers["x-apigate-source"] == SOURCE
    assert sample.headers["x-apigate-event-type"] == "READY_FOR_PROCESSING"
    assert stored_states(store_url, cancelled) == dict.fromkeys(cancelled, "filtered")

    # The route of a polled source takes no webhooks.
    sender = Sender(gateway.port, f"/webhooks/{SOURCE}")
    status, answer = sender.post(b"{}", {"content-type": "application/json"})
    sender.close()
    assert status == 403 and answer["reason"] == "sender_not_allowed"


def test_cursor_and_rotated_refresh_token_survive_sigkill(
    start_gateway: Callable[..., GatewayProcess],
    allegro: AllegroServer,
    handler: WebhookHandler,
    tmp_path: Path,
) -> None:
    config = gateway_config(f"sqlite:///{tmp_path / 'store.db'}", allegro, handler)
    first_gateway = start_gateway(config)
    wait_until_polling(allegro)
    first = allegro.add_events(20)
    wait_for_ids(handler, first)
    kill(first_gateway)
    queries_before_restart = len(allegro.event_queries)
    second = allegro.add_events(20)

    # The config still names the first refresh token, which the server has rotated away: only the
    # stored one works. The cursor must carry on after the last committed event.
    start_gateway(config)
    deliveries = wait_for_ids(handler, second)
    assert {d.webhook_id for d in deliveries} == set(first + second)
    assert_none_delivered_as_new_twice(deliveries)
    assert allegro.refused_refreshes == 0
    assert allegro.stats_calls == 1
    _, resumed = allegro.event_queries[queries_before_restart]
    assert resumed["from"] == [first[-1]]


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


def test_one_poller_per_cluster_and_the_survivor_takes_over(
    start_gateway: Callable[..., GatewayProcess],
    allegro: AllegroServer,
    handler: WebhookHandler,
    pg_url: str,
) -> None:
    config = gateway_config(pg_url, allegro, handler)
    gateways = [start_gateway(config), start_gateway(config)]
    wait_until_polling(allegro)
    first = allegro.add_events(30)
    wait_for_ids(handler, first)
    assert allegro.refreshes == 1, "only the lease holder polls, so only it refreshed"
    assert allegro.stats_calls == 1

    # Which one holds the lease is not known from outside: kill one, and if the survivor is the
    # holder nothing changes; if not, the survivor takes over once the lease lapses.
    kill(gateways[0])
    second = allegro.add_events(30)
    deliveries = wait_for_ids(handler, second, limit=45)
    assert {d.webhook_id for d in deliveries} == set(first + second)
    assert_none_delivered_as_new_twice(deliveries)
    assert allegro.refused_refreshes == 0, "a taking-over process refreshes with the stored token"


# -- the poller itself, with an injected clock ----------------------------------------------------------
class Collected:
    def __init__(self) -> None:
        self.events: list[PolledEvent] = []

    async def __call__(self, source: str, events: object) -> None:
        assert source == SOURCE
        self.events += list(events)  # type: ignore[call-overload]


async def _poller(allegro: AllegroServer, store: Store, clock: Callable[[], float], **extra: object):
    from apigate.outbound import HttpClient

    config = AllegroPollConfig.model_validate(poll_config(allegro, **extra))
    client = HttpClient()
    collected = Collected()
    return AllegroPoller(SOURCE, config, store, client, collected, clock), collected, client


def test_token_is_refreshed_before_it_expires_and_a_new_configured_token_wins(
    allegro: AllegroServer, tmp_path: Path
) -> None:
    allegro.access_lifetime = 3600
    now = [1_000_000.0]

    async def scenario() -> None:
        store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        await store.open()
        poller, collected, client = await _poller(allegro, store, lambda: now[0])
        try:
            allegro.add_events(2)
            assert await poller.poll() is False  # starts after the newest event
            ids = allegro.add_events(3)
            await poller.poll()
            assert [e.event_id for e in collected.events] == ids
            assert allegro.refreshes == 1

            now[0] += 3600 - REFRESH_MARGIN - 1  # still well within the token's life
            await poller.poll()
            assert allegro.refreshes == 1
            now[0] += 2  # within the margin: refreshed before any request is refused
            queries = len(allegro.event_queries)
            await poller.poll()
            assert allegro.refreshes == 2 and len(allegro.event_queries) == queries + 1

            # Someone authorized again and configured the new refresh token: it replaces the stored one.
            allegro.refresh_token = "reauthorized"
            renewed, _, renewed_client = await _poller(
                allegro, store, lambda: now[0], refresh_token="reauthorized"
            )
            try:
                await renewed.poll()
            finally:
                await renewed_client.close()
            assert allegro.refreshes == 3 and allegro.refused_refreshes == 0
        finally:
            await client.close()
            await store.close()

    asyncio.run(scenario())
