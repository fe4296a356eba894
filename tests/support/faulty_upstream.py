"""An upstream that can be told to fail: answer a status, reset, hang, be slow, refuse, recover.

Every answer names the server (``{"target": name, ...}``), so a test counts which target served
what. ``mode`` is read per request:
  "ok"              200 with the JSON body
  "status:503"      that status (any number)
  "reset"           closes the connection as soon as a request arrives, without answering
  "hang"            never answers (holds the connection)
  "slow:200"        answers after that many milliseconds
  "stall-head"      sends the first line of a response head, then nothing more
``stop()`` closes the listening socket (connections are then refused) and ``start()`` opens it
again on the same port. Run as a process (``python -m tests.support.faulty_upstream PORT NAME``)
for tests that SIGKILL a target.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from typing import Any

import httptools
import orjson


class _Handler(asyncio.Protocol):
    def __init__(self, server: FaultyUpstream) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[str, str] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.server.connections.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.headers = {}

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_message_complete(self) -> None:
        server = self.server
        mode = server.mode
        server.hits += 1
        server.paths.append(self.url.decode())
        transport = self.transport
        assert transport is not None
        if mode == "reset":
            transport.abort()
            return
        if mode == "hang":
            return
        if mode == "stall-head":
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n")
            return
        status = 200
        if mode.startswith("status:"):
            status = int(mode.split(":", 1)[1])
        body = orjson.dumps(
            {"target": server.name, "path": self.url.decode(), "host": self.headers.get("host")}
        )
        head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        response = head.encode() + body
        if mode.startswith("slow:"):
            asyncio.get_running_loop().call_later(
                int(mode.split(":", 1)[1]) / 1000, _write, transport, response
            )
        else:
            transport.write(response)


def _write(transport: asyncio.Transport, data: bytes) -> None:
    if not transport.is_closing():
        transport.write(data)


class FaultyUpstream:
    handler: type[_Handler] = _Handler  # what answers each connection (a subclass may answer otherwise)

    def __init__(self, name: str, port: int = 0, host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host
        self.mode = "ok"
        self.hits = 0
        self.paths: list[str] = []
        self.connections: set[Any] = set()
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.port = sock.getsockname()[1]
        self._sock: socket.socket | None = sock
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self) -> FaultyUpstream:
        async def serve() -> None:
            sock = self._sock
            if sock is None:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port))
            self._sock = None
            self._server = await self.loop.create_server(lambda: self.handler(self), sock=sock, backlog=1024)

        self._call(serve())
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection: the target now refuses."""

        async def close() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for transport in list(self.connections):
                transport.abort()

        self._call(close())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def main() -> None:
    port, name = int(sys.argv[1]), sys.argv[2]
    server = FaultyUpstream(name, port).start()
    print("ready", flush=True)
    server._thread.join()


if __name__ == "__main__":
    main()
