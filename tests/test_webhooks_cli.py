"""`apigate webhooks list|show|replay|purge|secret` against a SQLite store, as an operator runs them,
and the progress a bulk replay reports."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from apigate.store import open_store
from apigate.store.base import DeliveryOutcome, NewWebhookEvent
from apigate.webhooks import cli
from tests.support.cli import apigate_json


def seed(url: str, events: int = 3, dead: int = 1) -> None:
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


def test_bulk_replay_reports_progress_in_plain_counts_when_not_on_a_terminal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    seed(url, events=1200, dead=1200)
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
    seed(url, events=600, dead=600)
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
