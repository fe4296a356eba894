"""The Redis Streams destination against real redis-servers (the session's, or one a test stops and
starts again on its port; never the machine's 6379)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from standardwebhooks.webhooks import Webhook

from apigate.store import open_store
from apigate.store.roles.webhooks import DeliveryClaim
from apigate.webhooks.config import RedisStreamDestinationConfig
from apigate.webhooks.delivery import delivery_message
from apigate.webhooks.destinations import Message, Result
from apigate.webhooks.destinations.redis_streams import RedisConnections, RedisStreamDestination
from apigate.webhooks.signing import Signer
from tests.support.gateway import GatewayProcess
from tests.support.redis import RedisServer
from tests.support.webhook_sender import Sender, github_source

SIGNING_SECRET = "whsec_" + base64.b64encode(b"gateway-signing-key-for-tests!!!").decode()
STREAM = "orders"


def message(event_id: str, attempt: int = 1, source: str = "shop") -> Message:
    claim = DeliveryClaim(
        delivery_id=1,
        destination="queue",
        attempt=attempt,
        schedule_step=attempt,
        source=source,
        event_id=event_id,
        event_type="order.paid",
        received_at=time.time(),
        headers=(("content-type", "application/json"), ("x-shop-topic", "orders/paid"), ("x-other", "no")),
        body=b'{"order":42}',
    )
    return delivery_message(claim, Signer(SIGNING_SECRET), time.time())


def publish(redis_url: str, messages: list[Message], **options: object) -> list[Result]:
    async def run() -> list[Result]:
        connections = RedisConnections()
        config = {"type": "redis_stream", "url": redis_url, "stream": STREAM, **options}
        destination = RedisStreamDestination(RedisStreamDestinationConfig.model_validate(config), connections)
        try:
            return [await destination.deliver(m) for m in messages]
        finally:
            await connections.close()

    return asyncio.run(run())


def entries(redis_url: str) -> list[dict[str, str]]:
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        return [fields for _, fields in client.xrange(STREAM)]


def test_an_event_becomes_one_entry_with_its_id_attempt_body_and_chosen_headers(redis_url: str) -> None:
    [result] = publish(redis_url, [message("evt-1")], headers=["content-type", "X-Shop-Topic"])
    assert result.delivered
    [entry] = entries(redis_url)
    assert entry["webhook-id"] == "evt-1"
    assert (entry["source"], entry["type"], entry["attempt"]) == ("shop", "order.paid", "1")
    assert entry["body"] == '{"order":42}'
    assert entry["content-type"] == "application/json" and entry["x-shop-topic"] == "orders/paid"
    assert "x-other" not in entry
    # The gateway's signature travels with the entry; the official library accepts it.
    Webhook(SIGNING_SECRET).verify(entry["body"], entry)


def test_a_repeat_within_the_window_adds_nothing_and_counts_as_delivered(redis_url: str) -> None:
    # Attempt 2 is what follows a publish whose acknowledgement was lost.
    results = publish(redis_url, [message("evt-1"), message("evt-1", attempt=2), message("evt-2")])
    assert all(r.delivered for r in results)
    assert [(e["webhook-id"], e["attempt"]) for e in entries(redis_url)] == [("evt-1", "1"), ("evt-2", "1")]
    # The same id from another source is another event.
    publish(redis_url, [message("evt-1", source="other-shop")])
    assert len(entries(redis_url)) == 3


def test_without_a_window_every_publish_adds_an_entry_and_maxlen_trims(redis_url: str) -> None:
    publish(redis_url, [message("evt-1"), message("evt-1", attempt=2)], dedupe_window=0)
    assert len(entries(redis_url)) == 2
    publish(redis_url, [message(f"bulk-{n}") for n in range(500)], maxlen=10)
    # MAXLEN ~ trims whole internal nodes (100 entries each by default): about 10, never all 502.
    assert 10 <= len(entries(redis_url)) <= 110


def test_redis_down_is_a_failed_attempt_with_the_reason(tmp_path: Path) -> None:
    down = RedisServer(tmp_path / "redis")  # never started: nothing listens on its port
    [result] = publish(f"redis://127.0.0.1:{down.port}/0", [message("evt-1")], timeout="1s")
    assert not result.delivered and result.error is not None and "redis" in result.error


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, so that stopping it disturbs no other test."""
    server = RedisServer(tmp_path / "own-redis").start()
    yield server
    server.stop()


def delivery_attempts(store_url: str, event_id: str) -> int:
    async def read() -> int:
        store = open_store(store_url)
        await store.open()
        try:
            detail = await store.get_webhook_event("github", event_id)
        finally:
            await store.close()
        return 0 if detail is None else detail.deliveries[0].attempts

    return asyncio.run(read())


def test_events_wait_while_redis_is_down_and_arrive_when_it_is_back(
    start_gateway: Callable[..., GatewayProcess], own_redis: RedisServer, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    own_redis.stop()
    gateway = start_gateway(
        {
            "store": {"url": store_url},
            "webhooks": {
                "signing_secret": SIGNING_SECRET,
                "poll_interval": "50ms",
                "sources": {"github": github_source(["queue"])},
                "destinations": {
                    "queue": {
                        "type": "redis_stream",
                        "url": own_redis.url,
                        "stream": STREAM,
                        "timeout": "1s",
                        "retry": {"schedule": [0] + ["300ms"] * 30, "jitter": 0},
                    }
                },
            },
        }
    )
    sender = Sender(gateway.port, "/webhooks/github")
    ids = [f"delivery-{n}" for n in range(3)]
    for event_id in ids:
        assert sender.send(event_id)[0] == 200
    sender.close()

    deadline = time.monotonic() + 20
    while min(delivery_attempts(store_url, event_id) for event_id in ids) < 3:
        assert time.monotonic() < deadline, "the failed attempts were not retried on schedule"
        time.sleep(0.1)
    own_redis.start()

    deadline = time.monotonic() + 20
    while {e["webhook-id"] for e in entries(own_redis.url)} != set(ids):
        assert time.monotonic() < deadline, f"not all published: {entries(own_redis.url)}"
        time.sleep(0.05)
    published = entries(own_redis.url)
    assert len(published) == len(ids)
    assert all(int(e["attempt"]) >= 3 and e["source"] == "github" for e in published)
