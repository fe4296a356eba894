"""A target for health-check tests: an HTTP server on 127.0.0.1, on its own thread and event loop,
whose behaviour the test changes while it runs.

- ``status``: what it answers (200 unless set), with ``Connection: close``;
- ``behaviour = "hang"``: reads the request and never answers (until the client hangs up);
- ``behaviour = "reset"``: reads the request and resets the connection (RST, no answer);
- ``stop_listening()``: closes the listening socket and every open connection, so connects are
  refused; ``listen_again()`` listens on the same port. A second socket, bound with
  SO_REUSEPORT and never listening, holds the port meanwhile, so no other test's server takes it.

Every request is recorded in ``requests`` (with its arrival time, time.monotonic), and
``most_in_flight`` counts, per path, the most requests open at once.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Probe:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names
    arrived: float  # time.monotonic()
    connection: int  # which accepted connection carried it (1, 2, ...)


class HealthTarget:
    def __init__(self) -> None:
        self.status = 200
        self.behaviour: Literal["answer", "hang", "reset"] = "answer"
        self.requests: list[Probe] = []
        self.accepted = 0
        self.in_flight: Counter[str] = Counter()
        self.most_in_flight: Counter[str] = Counter()
        self.port = 0
        self._holder = socket.socket()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self, path: str) -> list[Probe]:
        return [probe for probe in self.requests if probe.path == path]

    def start(self) -> HealthTarget:
        self._holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._holder.bind(("127.0.0.1", 0))
        self.port = self._holder.getsockname()[1]
        self._thread.start()
        self.listen_again()
        return self

    def listen_again(self) -> None:
        self._call(self._listen())

    def stop_listening(self) -> None:
        self._call(self._close())

    def stop(self) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._holder.close()

    def _call(self, work: object) -> None:
        asyncio.run_coroutine_threadsafe(work, self._loop).result(5)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._server = await asyncio.start_server(self._serve, sock=listener)

    async def _close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._open):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        connection = self.accepted
        self._open.add(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {}
            for line in filter(None, lines):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            path, _, query = target.partition("?")
            self.requests.append(Probe(method, path, query, headers, time.monotonic(), connection))
            self.in_flight[path] += 1
            self.most_in_flight[path] = max(self.most_in_flight[path], self.in_flight[path])
            try:
                await self._answer(method, reader, writer)
            finally:
                self.in_flight[path] -= 1
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            self._open.discard(writer)
            writer.close()

    async def _answer(self, method: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.behaviour == "hang":
            await reader.read()  # until the client gives up and closes
        elif self.behaviour == "reset":
            # Linger 0: close() sends RST instead of FIN.
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            writer.transport.abort()
        else:
            status = self.status
            body = b"" if status in (204, 304) else b'{"status": %d}' % status
            length = b"" if status == 204 else b"content-length: %d\r\n" % len(body)
            writer.write(b"HTTP/1.1 %d X\r\n%sconnection: close\r\n\r\n" % (status, length))
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
