"""`apigate webhooks list|show|replay|purge|secret` against a SQLite store, as an operator runs them,
and the progress a bulk replay reports."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from standardwebhooks.webhooks import Webhook

from apigate.cli import webhooks as cli
from apigate.store import open_store
from apigate.store.roles.webhooks import DeliveryOutcome, NewWebhookEvent
from apigate.webhooks.signing import SECRET_SETTING
from tests.support.cli import apigate_json
from tests.support.gateway import GatewayProcess
from tests.support.webhook_handler import WebhookHandler
from tests.support.webhook_sender import Sender, github_source


def fill_store(url: str, events: int = 3, dead: int = 1) -> None:
    """``events`` events of source stripe to destination h, the first ``dead`` of them dead."""

    async def write() -> None:
        store = open_store(url)
        await store.open()
        try:
            await store.add_webhook_events(
                [
                    NewWebhookEvent(
                        "stripe", f"evt_{n}", "charge.succeeded", 1000.0 + n, (), b"{}", ("h",), 0.0
                    )
                    for n in range(events)
                ]
            )
            claims = await store.claim_webhook_deliveries("h", dead, 10.0, 20.0)
            await store.record_webhook_outcomes(
                [
                    DeliveryOutcome(claim.delivery_id, "h", 1, 10.0, 0.5, 500, "answered 500", "dead", 10.0)
                    for claim in claims
                ]
            )
        finally:
            await store.close()

    asyncio.run(write())


def test_list_show_replay_purge_and_secret(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    fill_store(url)
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


def webhooks_secret(config_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`apigate webhooks secret -c FILE` as an operator runs it next to a running gateway."""
    done = subprocess.run(
        [sys.executable, "-m", "apigate", "webhooks", "secret", "-c", str(config_path), *flags],
        cwd=config_path.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


def stored_secret(url: str) -> str | None:
    async def read() -> str | None:
        store = open_store(url)
        await store.open()
        try:
            return await store.get_setting(SECRET_SETTING)
        finally:
            await store.close()

    return asyncio.run(read())


def delivery_config(store_url: str, handler: WebhookHandler, signing_secret: str | None) -> dict:
    webhooks: dict = {
        "poll_interval": "50ms",
        "sources": {"github": github_source(["handler"])},
        "destinations": {"handler": {"url": handler.url, "timeout": "2s"}},
    }
    if signing_secret is not None:
        webhooks["signing_secret"] = signing_secret
    return {"store": {"url": store_url}, "webhooks": webhooks}


def assert_delivery_verifies_with(gateway: GatewayProcess, handler: WebhookHandler, secret: str) -> None:
    sender = Sender(gateway.port, "/webhooks/github")
    try:
        assert sender.send("delivery-1", {"action": "opened"})[0] == 200
        [delivery] = handler.wait_for(lambda seen: len(seen) == 1)
        Webhook(secret).verify(delivery.body, delivery.headers)  # raises if signed with another key
    finally:
        sender.close()


def test_secret_shows_the_config_secret_deliveries_are_signed_with_and_leaves_the_store_alone(
    start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    configured = "whsec_" + base64.b64encode(b"the-operator-chose-this-key-32by").decode()
    url = f"sqlite:///{tmp_path / 'store.db'}"
    handler = WebhookHandler().start()
    try:
        gateway = start_gateway(delivery_config(url, handler, configured))
        shown = webhooks_secret(gateway.config_path)
        printed = shown.stdout.strip()
        assert printed == configured
        assert f"from webhooks.signing_secret in {gateway.config_path}" in shown.stderr
        assert orjson.loads(webhooks_secret(gateway.config_path, "--json").stdout) == {
            "signing_secret": configured,
            "source": "config",
            "created": False,
            "config": str(gateway.config_path),
        }
        assert stored_secret(url) is None  # no second secret written beside the config's
        assert_delivery_verifies_with(gateway, handler, printed)
    finally:
        handler.stop()


def test_secret_without_one_in_the_config_is_the_store_one_created_once(
    start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    config_path = tmp_path / "apigate.yaml"
    handler = WebhookHandler().start()
    try:
        config_path.write_text(orjson.dumps(delivery_config(url, handler, None)).decode())  # JSON is YAML
        first = webhooks_secret(config_path, "--json")
        created = orjson.loads(first.stdout)
        assert created["source"] == "store" and created["created"] is True
        again = webhooks_secret(config_path)
        assert again.stdout.strip() == created["signing_secret"] == stored_secret(url)
        assert "kept in the store (no webhooks.signing_secret in" in again.stderr
        gateway = start_gateway(delivery_config(url, handler, None))
        assert_delivery_verifies_with(gateway, handler, created["signing_secret"])
    finally:
        handler.stop()


def test_bulk_replay_reports_progress_in_plain_counts_when_not_on_a_terminal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    fill_store(url, events=1200, dead=1200)
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        replayed = apigate_json(
            tmp_path, url, "webhooks", "replay", "--status", "dead", stderr=stderr.fileno()
        )
        stderr.seek(0)
        progress = stderr.read().splitlines()
    assert replayed == {"replayed": 1200}
    assert progress == ["replayed 500/1200 events", "replayed 1000/1200 events", "replayed 1200/1200 events"]
    # The schedule restarts and the numbering goes on, as for a replay of one event.
    assert apigate_json(tmp_path, url, "webhooks", "list", "--status", "dead") == []
    shown = apigate_json(tmp_path, url, "webhooks", "show", "stripe", "evt_7")
    assert [(d["state"], d["attempts"]) for d in shown["deliveries"]] == [("pending", 1)]


def test_bulk_replay_draws_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    fill_store(url, events=600, dead=600)
    terminal, child_side = os.openpty()
    try:
        replayed = apigate_json(tmp_path, url, "webhooks", "replay", stderr=child_side)
        os.close(child_side)
        drawn = read_all(terminal)
    finally:
        os.close(terminal)
    assert replayed == {"replayed": 600}
    bar = "#" * (cli.ReplayProgress.WIDTH * 500 // 600)
    assert drawn == (
        f"\rreplaying [{bar.ljust(cli.ReplayProgress.WIDTH, '-')}] 500/600 events"
        f"\rreplaying [{'#' * cli.ReplayProgress.WIDTH}] 600/600 events\r\n"  # the terminal adds \r
    )


def read_all(terminal: int) -> str:
    """What was written to the terminal, once its other side is closed (Linux then says EIO)."""
    chunks = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()
