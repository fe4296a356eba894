"""`apigate webhooks list|show|replay|purge|secret` against a SQLite store, as an operator runs them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from apigate.store import open_store
from apigate.store.base import DeliveryOutcome, NewWebhookEvent
from tests.support.cli import apigate_json


def seed(url: str) -> None:
    async def write() -> None:
        store = open_store(url)
        await store.open()
        try:
            events = [
                NewWebhookEvent("stripe", f"evt_{n}", "charge.succeeded", 1000.0 + n, (), b"{}", ("h",), 0.0)
                for n in range(3)
            ]
            await store.add_webhook_events(events)
            claims = await store.claim_webhook_deliveries("h", 1, 10.0, 20.0)
            await store.record_webhook_outcomes(
                [DeliveryOutcome(claims[0].delivery_id, 1, 10.0, 0.5, 500, None, "dead", 10.0)]
            )
        finally:
            await store.close()

    asyncio.run(write())


def test_list_show_replay_purge_and_secret(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    seed(url)
    listed = apigate_json(tmp_path, url, "webhooks", "list")
    assert [(e["event_id"], e["state"]) for e in listed] == [
        ("evt_2", "pending"),
        ("evt_1", "pending"),
        ("evt_0", "dead"),
    ]
    dead = apigate_json(tmp_path, url, "webhooks", "list", "--status", "dead")
    assert [e["event_id"] for e in dead] == ["evt_0"]
    shown = apigate_json(tmp_path, url, "webhooks", "show", "stripe", "evt_0")
    assert shown["deliveries"][0]["attempt_log"][0]["status"] == 500
    assert apigate_json(tmp_path, url, "webhooks", "replay", "--status", "dead") == {"replayed": 1}
    assert apigate_json(tmp_path, url, "webhooks", "list", "--status", "dead") == []
    # Nothing is finished now, so nothing is purged however old.
    assert apigate_json(tmp_path, url, "webhooks", "purge", "--older-than", "1d") == {"purged": 0}
    secret = apigate_json(tmp_path, url, "webhooks", "secret")["signing_secret"]
    assert (
        secret.startswith("whsec_")
        and apigate_json(tmp_path, url, "webhooks", "secret")["signing_secret"] == secret
    )
