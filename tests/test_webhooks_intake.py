"""Webhook intake and delivery end to end: a real gateway process, a real handler, SQLite on disk."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from apigate.store import open_store
from apigate.store.roles.webhooks import WebhookEventDetail
from tests.support.cli import seconds_until
from tests.support.gateway import GatewayProcess
from tests.support.webhook_handler import WebhookHandler
from tests.support.webhook_sender import Sender, github_source, signed_headers

SIGNING_SECRET = "whsec_" + base64.b64encode(b"gateway-signing-key-for-tests!!!").decode()
FAST_RETRIES = {"schedule": [0, "100ms", "100ms"], "jitter": 0}


@pytest.fixture
def handler() -> Iterator[WebhookHandler]:
    made = WebhookHandler()
    yield made
    made.stop()


def config(tmp_path: Path, handler: WebhookHandler, **source: object) -> dict:
    return {
        "store": {"url": f"sqlite:///{tmp_path / 'store.db'}"},
        "webhooks": {
            "signing_secret": SIGNING_SECRET,
            "poll_interval": "50ms",
            "sources": {"github": github_source(["handler"], **source)},
            "destinations": {"handler": {"url": handler.url, "timeout": "2s", "retry": FAST_RETRIES}},
        },
    }


def stored_event(tmp_path: Path, event_id: str) -> WebhookEventDetail | None:
    async def read() -> WebhookEventDetail | None:
        store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        await store.open()
        try:
            return await store.get_webhook_event("github", event_id)
        finally:
            await store.close()

    return asyncio.run(read())


def test_accepted_event_is_delivered_with_the_gateway_signature(
    start_gateway: Callable[..., GatewayProcess], handler: WebhookHandler, tmp_path: Path
) -> None:
    handler.start()
    gateway = start_gateway(config(tmp_path, handler))
    sender = Sender(gateway.port, "/webhooks/github")
    status, answer = sender.send("delivery-1", {"action": "opened"}, event="pull_request")
    assert (status, answer["status"], answer["event_id"]) == (200, "accepted", "delivery-1")

    [delivery] = handler.wait_for(lambda seen: len(seen) == 1)
    assert delivery.body == b'{"action":"opened"}'
    assert delivery.webhook_id == "delivery-1" and delivery.attempt == 1
    assert delivery.headers["x-github-event"] == "pull_request"
    assert delivery.headers["x-apigate-event-type"] == "pull_request"
    # The official Standard Webhooks library accepts the gateway's signature.
    Webhook(SIGNING_SECRET).verify(delivery.body, delivery.headers)
    sender.close()


def test_bad_input_is_refused_with_a_reason_and_nothing_is_stored(
    start_gateway: Callable[..., GatewayProcess], handler: WebhookHandler, tmp_path: Path
) -> None:
    gateway = start_gateway(config(tmp_path, handler))
    sender = Sender(gateway.port, "/webhooks/github")
    body = b'{"id":1}'
    tampered = signed_headers(b'{"id":2}', "d-1")
    assert sender.post(body, tampered)[0] == 401
    assert sender.post(body, tampered)[1]["reason"] == "bad_signature"
    missing = {k: v for k, v in signed_headers(body, "d-2").items() if k != "X-Hub-Signature-256"}
    status, answer = sender.post(body, missing)
    assert (status, answer["reason"]) == (401, "missing_signature")
    malformed = {**signed_headers(body, "d-3"), "X-Hub-Signature-256": "sha256=zz"}
    status, answer = sender.post(body, malformed)
    assert (status, answer["reason"]) == (400, "malformed_signature")
    wrong_secret = signed_headers(body, "d-4", secret="another-secret-0123456789")
    assert sender.post(body, wrong_secret)[0] == 401
    sender.close()
    for event_id in ("d-1", "d-2", "d-3", "d-4"):
        assert stored_event(tmp_path, event_id) is None


def test_a_duplicate_is_acknowledged_and_not_delivered_again(
    start_gateway: Callable[..., GatewayProcess], handler: WebhookHandler, tmp_path: Path
) -> None:
    handler.start()
    gateway = start_gateway(config(tmp_path, handler))
    sender = Sender(gateway.port, "/webhooks/github")
    assert sender.send("same-id")[1]["status"] == "accepted"
    handler.wait_for(lambda seen: len(seen) == 1)
    status, answer = sender.send("same-id")
    assert (status, answer["status"]) == (200, "duplicate")
    sender.send("other-id")  # delivered after the duplicate would have been
    seen = handler.wait_for(lambda seen: "other-id" in {d.webhook_id for d in seen})
    assert [d.webhook_id for d in seen].count("same-id") == 1
    sender.close()


def test_handler_down_then_up_gets_the_event_on_a_retry(
    start_gateway: Callable[..., GatewayProcess], handler: WebhookHandler, tmp_path: Path
) -> None:
    slow_retries = {"schedule": [0, "300ms", "300ms", "300ms", "300ms", "300ms"], "jitter": 0}
    settings = config(tmp_path, handler)
    settings["webhooks"]["destinations"]["handler"]["retry"] = slow_retries
    gateway = start_gateway(settings)
    sender = Sender(gateway.port, "/webhooks/github")
    assert sender.send("while-down")[0] == 200

    def attempted() -> bool:
        detail = stored_event(tmp_path, "while-down")
        return detail is not None and len(detail.deliveries[0].attempt_log) >= 1

    seconds_until(attempted)  # the first attempt met a closed port
    handler.start()
    [delivery] = handler.wait_for(lambda seen: len(seen) == 1)
    assert delivery.webhook_id == "while-down" and delivery.attempt >= 2
    detail = stored_event(tmp_path, "while-down")
    assert detail is not None
    first = detail.deliveries[0].attempt_log[0]
    assert first.status is None and first.error and first.error.startswith("connect")
    sender.close()


def test_retries_exhausted_dead_letters_the_event(
    start_gateway: Callable[..., GatewayProcess], handler: WebhookHandler, tmp_path: Path
) -> None:
    handler.status = 503
    handler.start()
    gateway = start_gateway(config(tmp_path, handler))
    sender = Sender(gateway.port, "/webhooks/github")
    assert sender.send("doomed")[0] == 200

    def dead() -> bool:
        detail = stored_event(tmp_path, "doomed")
        return detail is not None and detail.summary.state == "dead"

    seconds_until(dead)
    detail = stored_event(tmp_path, "doomed")
    assert detail is not None
    [delivery] = detail.deliveries
    assert [a.attempt for a in delivery.attempt_log] == [1, 2, 3]
    assert all(a.status == 503 for a in delivery.attempt_log)
    assert handler.requests_seen == 3
    sender.close()


def test_sync_mode_answers_with_the_handler_reply(
    start_gateway: Callable[..., GatewayProcess], handler: WebhookHandler, tmp_path: Path
) -> None:
    handler.answer = b'{"handled":"now"}'
    handler.status = 202
    handler.start()
    gateway = start_gateway(config(tmp_path, handler, mode="sync"))
    sender = Sender(gateway.port, "/webhooks/github")
    assert sender.send("sync-1") == (202, {"handled": "now"})
    assert sender.post(b"{}", signed_headers(b"{x}", "sync-2"))[0] == 401
    handler.stop()
    status, answer = sender.send("sync-3")
    assert status in (502, 504) and "did not answer" in answer["error"]
    sender.close()
