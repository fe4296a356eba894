"""Nothing acknowledged is lost: gateways killed with SIGKILL mid-stream and mid-delivery.

The client counts an event only when it got a 2xx; a request cut by the kill is sent again (as a
provider would), to whichever gateway is up. The handler records ``webhook-id`` and the attempt
number of every delivery it accepts: every counted event must arrive, and no (id, attempt) may
arrive twice, so no event is ever delivered as new twice.
"""

from __future__ import annotations

import http.client
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.pg import fresh_database
from tests.support.webhook_handler import Delivery, WebhookHandler
from tests.support.webhook_sender import Sender, github_source

EVENTS = 1000
SENDERS = 4
# Long enough that nothing is dead-lettered while the handler is down; short enough to retry soon.
RETRIES = {"schedule": [0] + ["500ms"] * 49, "jitter": 0}


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


def gateway_config(store_url: str, handler: WebhookHandler) -> dict:
    return {
        "store": {"url": store_url},
        "webhooks": {
            "poll_interval": "100ms",
            "sources": {"github": github_source(["handler"])},
            "destinations": {
                "handler": {"url": handler.url, "timeout": "2s", "concurrency": 20, "retry": RETRIES}
            },
        },
    }


class Stream:
    """SENDERS threads sending EVENTS ids to whichever port ``ports`` currently names."""

    def __init__(self, ports: list[int], prefix: str) -> None:
        self.ports = ports
        self.prefix = prefix
        self.accepted: set[str] = set()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._send, args=(n,), daemon=True) for n in range(SENDERS)]

    def start(self) -> Stream:
        for thread in self.threads:
            thread.start()
        return self

    def count(self) -> int:
        with self.lock:
            return len(self.accepted)

    def join(self, limit: float = 120.0) -> set[str]:
        deadline = time.monotonic() + limit
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), "the senders did not finish"
        return set(self.accepted)

    def _send(self, lane: int) -> None:
        deadline = time.monotonic() + 120
        sender: Sender | None = None
        for number in range(lane, EVENTS, SENDERS):
            event_id = f"{self.prefix}-{number}"
            while time.monotonic() < deadline:
                try:
                    if sender is None:
                        sender = Sender(self.ports[-1], "/webhooks/github")
                    status, _ = sender.send(event_id)
                except (OSError, http.client.HTTPException):
                    # Cut by the kill (or nothing listens yet): not counted; send it again.
                    if sender is not None:
                        sender.close()
                    sender = None
                    time.sleep(0.05)
                    continue
                if 200 <= status < 300:
                    with self.lock:
                        self.accepted.add(event_id)
                    break
                time.sleep(0.05)
        if sender is not None:
            sender.close()


def wait_until(condition: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {limit}s")
        time.sleep(0.05)


def kill(gateway: GatewayProcess) -> None:
    gateway.signal(signal.SIGKILL)
    assert gateway.proc is not None
    gateway.proc.wait(10)


def assert_delivered_once_as_new(accepted: set[str], deliveries: list[Delivery]) -> None:
    assert accepted <= {d.webhook_id for d in deliveries}
    repeated = [key for key, n in Counter((d.webhook_id, d.attempt) for d in deliveries).items() if n > 1]
    assert not repeated, f"delivered twice under the same attempt number: {repeated[:5]}"
    as_new = Counter(d.webhook_id for d in deliveries if d.attempt == 1)
    assert max(as_new.values(), default=1) == 1


def kill_and_restart_while_the_handler_is_down(
    start_gateway: Callable[..., GatewayProcess], store_url: str, prefix: str
) -> None:
    handler = WebhookHandler()
    config = gateway_config(store_url, handler)
    first = start_gateway(config)
    ports = [first.port]
    stream = Stream(ports, prefix).start()
    wait_until(lambda: stream.count() >= EVENTS // 3, 60, "a third of the events accepted")
    kill(first)
    assert stream.count() < EVENTS, "the kill came after the stream ended"
    ports.append(start_gateway(config).port)
    accepted = stream.join()
    assert len(accepted) == EVENTS
    handler.start()
    try:
        deliveries = handler.wait_for(lambda seen: accepted <= {d.webhook_id for d in seen}, limit=60)
        assert_delivered_once_as_new(accepted, deliveries)
        # The handler was down whenever a gateway died, so each event arrived exactly once.
        assert len(deliveries) == len({d.webhook_id for d in deliveries})
    finally:
        handler.stop()


def test_sqlite_kill_mid_stream_loses_nothing(
    start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    kill_and_restart_while_the_handler_is_down(start_gateway, f"sqlite:///{tmp_path / 'store.db'}", "sq")


def test_postgres_kill_mid_stream_loses_nothing(
    start_gateway: Callable[..., GatewayProcess], pg_url: str
) -> None:
    kill_and_restart_while_the_handler_is_down(start_gateway, pg_url, "pg")


def test_postgres_two_gateways_one_killed_mid_delivery(
    start_gateway: Callable[..., GatewayProcess], pg_url: str
) -> None:
    handler = WebhookHandler(delay=0.05).start()  # slow answers: attempts are in flight at the kill
    try:
        config = gateway_config(pg_url, handler)
        doomed, survivor = start_gateway(config), start_gateway(config)
        ports = [doomed.port]
        stream = Stream(ports, "two").start()
        wait_until(lambda: len(handler.snapshot()) >= 50, 60, "deliveries under way")
        ports.append(survivor.port)
        kill(doomed)
        accepted = stream.join()
        assert len(accepted) == EVENTS
        deliveries = handler.wait_for(lambda seen: accepted <= {d.webhook_id for d in seen}, limit=60)
        assert_delivered_once_as_new(accepted, deliveries)
    finally:
        handler.stop()
