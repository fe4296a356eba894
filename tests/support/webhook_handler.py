"""A webhook handler for tests: a real HTTP/1.1 server on its own thread that records every delivery.

It can be made to fail (``status``), to ask for a delay (``retry_after``), to answer slowly
(``delay``), and it can start late on a port chosen up front, so that "the handler is down,
then comes up" is a real refused connection followed by a real server on the same address.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools


@dataclass(frozen=True)
class Delivery:
    webhook_id: str
    attempt: int
    headers: dict[str, str]
    body: bytes
    at: float


def reserve_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class WebhookHandler:
    port: int = field(default_factory=reserve_port)
    status: int = 200
    retry_after: str | None = None
    delay: float = 0.0
    answer: bytes = b'{"ok":true}'
    deliveries: list[Delivery] = field(default_factory=list)  # the ones answered 2xx
    requested: list[str] = field(default_factory=list)  # webhook-id of every request, whatever the answer
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> WebhookHandler:
        ready = threading.Event()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(1024)
            server = self._loop.run_until_complete(
                self._loop.create_server(lambda: _Protocol(self), sock=sock)
            )
            ready.set()
            try:
                self._loop.run_forever()
            finally:
                server.close()
                self._loop.close()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        if not ready.wait(5):
            raise RuntimeError("the webhook handler did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._thread = None

    @property
    def requests_seen(self) -> int:
        return len(self.requested)

    def record(self, delivery: Delivery) -> None:
        with self._lock:
            self.deliveries.append(delivery)

    def snapshot(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)

    def ids(self) -> set[str]:
        return {d.webhook_id for d in self.snapshot()}

    def wait_for(self, condition: Callable[[list[Delivery]], bool], limit: float = 20.0) -> list[Delivery]:
        """Poll until ``condition(deliveries)`` holds; fail with what was seen after ``limit`` seconds."""
        deadline = time.monotonic() + limit
        while True:
            seen = self.snapshot()
            if condition(seen):
                return seen
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {limit}s; {len(seen)} deliveries seen")
            time.sleep(0.02)


class _Protocol(asyncio.Protocol):
    def __init__(self, handler: WebhookHandler) -> None:
        self.handler = handler
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.headers: dict[str, str] = {}
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.headers, self.body = {}, bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        handler = self.handler
        headers, body = self.headers, bytes(self.body)
        status, retry_after, delay, answer = (
            handler.status,
            handler.retry_after,
            handler.delay,
            handler.answer,
        )

        handler.requested.append(headers.get("webhook-id", ""))

        def respond() -> None:
            # Recorded when answered, as a real handler commits before its 2xx.
            if 200 <= status < 300:
                handler.record(
                    Delivery(
                        headers.get("webhook-id", ""),
                        int(headers.get("x-apigate-attempt", "0")),
                        headers,
                        body,
                        time.time(),
                    )
                )
            extra = f"retry-after: {retry_after}\r\n" if retry_after is not None else ""
            head = (
                f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                f"content-length: {len(answer)}\r\n{extra}\r\n"
            )
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(head.encode() + answer)

        if delay:
            asyncio.get_running_loop().call_later(delay, respond)
        else:
            respond()
