"""Operating webhooks with real gateway processes: FIFO delivery across two gateways on PostgreSQL,
and deliveries left pending for destinations removed from the config."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.cli import apigate_json, seconds_until
from tests.support.gateway import GatewayProcess
from tests.support.pg import fresh_database
from tests.support.webhook_handler import WebhookHandler
from tests.support.webhook_sender import Sender, github_source


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


def destination(handler: WebhookHandler, retry_every: str) -> dict:
    return {"url": handler.url, "timeout": "2s", "retry": {"schedule": [0] + [retry_every] * 49, "jitter": 0}}


def test_postgres_fifo_order_holds_across_two_gateways_while_the_head_fails(
    start_gateway: Callable[..., GatewayProcess], pg_url: str
) -> None:
    handler = WebhookHandler(status=503).start()
    config = {
        "store": {"url": pg_url},
        "webhooks": {
            "poll_interval": "50ms",
            "sources": {"github": github_source([{"name": "ledger", "fifo": True}])},
            "destinations": {"ledger": destination(handler, "200ms")},
        },
    }
    ids = [f"fifo-{n}" for n in range(10)]
    try:
        gateways = [start_gateway(config), start_gateway(config)]
        senders = [Sender(gateway.port, "/webhooks/github") for gateway in gateways]
        for number, event_id in enumerate(ids):  # alternately, each after the last was accepted
            assert senders[number % 2].send(event_id)[0] == 200
        seconds_until(lambda: handler.requests_seen >= 5, limit=20)
        assert set(handler.requested) == {"fifo-0"}  # both gateways retry the head, nothing else
        handler.status = 200
        deliveries = handler.wait_for(lambda seen: len(seen) >= len(ids), limit=30)
        assert [d.webhook_id for d in deliveries] == ids
        assert handler.requested[handler.requested.index("fifo-1") :] == ids[1:]  # each once, in order
    finally:
        handler.stop()


def test_deliveries_pending_for_a_removed_destination_are_reported(
    start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    # Bound and never listening, for the whole test: every attempt is refused, and no server of
    # another test can take the port meanwhile (a port only reserved once could be).
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))
    down = WebhookHandler(port=refusing.getsockname()[1])  # never started
    kept = WebhookHandler().start()
    url = f"sqlite:///{tmp_path / 'store.db'}"

    def config(destinations: dict) -> dict:
        return {
            "store": {"url": url},
            "webhooks": {
                "poll_interval": "50ms",
                "sources": {"github": github_source(list(destinations))},
                "destinations": destinations,
            },
        }

    try:
        gateway = start_gateway(config({"gone": destination(down, "1h")}))
        sender = Sender(gateway.port, "/webhooks/github")
        for n in range(3):
            assert sender.send(f"removed-{n}")[0] == 200
        gateway.write_config(config({"kept": destination(kept, "1h")}))
        gateway.signal(signal.SIGHUP)
        seconds_until(lambda: "destination gone is not in the config, but 3 deliveries" in gateway.output())
        listed = apigate_json(tmp_path, url, "webhooks", "destinations", "-c", str(gateway.config_path))
        assert [(d["name"], d["state"], d["configured"], d["pending"]) for d in listed] == [
            ("gone", "removed", False, 3),
            ("kept", "enabled", True, 0),
        ]
        assert listed[0]["last_error"].startswith("connect")
    finally:
        kept.stop()
        refusing.close()
