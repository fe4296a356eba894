"""A small HTTP/1.1 server for the demo: answers JSON for any path and echoes what it received."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httptools
import orjson


class DemoUpstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body_size = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()  # type: ignore[union-attr]

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body_size = b"", {}, 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)

    def on_message_complete(self) -> None:
        path = self.url.decode("latin-1")
        payload = {
            "message": "hello from the apigate demo upstream",
            "method": self.parser.get_method().decode(),
            "path": path,
            "request_id": self.headers.get("x-request-id"),
            "forwarded_for": self.headers.get("x-forwarded-for"),
            "body_bytes": self.body_size,
        }
        body = orjson.dumps(payload)
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        if not self.parser.should_keep_alive():
            self.transport.close()  # type: ignore[union-attr]


def bind_demo_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    sock.setblocking(False)
    return sock


async def serve_demo(sock: socket.socket) -> asyncio.AbstractServer:
    return await asyncio.get_running_loop().create_server(DemoUpstream, sock=sock)
