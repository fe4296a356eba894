"""Helpers for the proxy tests: a raw HTTP/1.x client socket, module-scoped servers, RSS sampling
and a websocket echo upstream.

The raw client exists because http.client hides exactly what these tests look at: framing
(chunked or not), whether the gateway closed the connection, pipelining, interim 100 answers.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.gateway import GatewayProcess
from tests.support.upstream import UpstreamServer

DEFAULT_TIMEOUT = 10.0


# -- servers for module-scoped fixtures -----------------------------------------------------------
@contextlib.contextmanager
def running_upstream() -> Iterator[UpstreamServer]:
    server = UpstreamServer().start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def running_gateway(directory: Path, config: dict, **kwargs: Any) -> Iterator[GatewayProcess]:
    directory.mkdir(parents=True, exist_ok=True)
    gateway = GatewayProcess(directory, config, **kwargs).start()
    try:
        yield gateway
    finally:
        gateway.stop()


@contextlib.contextmanager
def gateway_before_upstream(
    directory: Path, config_for: Callable[[str], dict]
) -> Iterator[tuple[GatewayProcess, UpstreamServer]]:
    """An upstream, and a gateway in front of it whose config ``config_for(upstream_url)`` makes."""
    with running_upstream() as upstream, running_gateway(directory, config_for(upstream.url)) as gateway:
        yield gateway, upstream


def find_request(upstream: UpstreamServer, request_id: str, timeout: float = 5.0):
    """The request the upstream recorded with this X-Request-ID (waits for it to be recorded)."""
    deadline = time.monotonic() + timeout
    while True:
        for seen in list(upstream.requests):
            if seen.header("x-request-id") == request_id:
                return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"upstream never saw a request with x-request-id {request_id}")
        time.sleep(0.01)


# -- a raw HTTP/1.x client ----------------------------------------------------------------------------
@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunked: bool = False
    chunk_sizes: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    def names(self) -> set[str]:
        return {key for key, _ in self.headers}

    def json(self) -> Any:
        import orjson

        return orjson.loads(self.body)


class RawConnection:
    """One client socket to the gateway; reads are buffered and bounded by a socket timeout."""

    def __init__(
        self, port: int, timeout: float = DEFAULT_TIMEOUT, host: str = "127.0.0.1", source: str | None = None
    ) -> None:
        """``source``: the local address to connect from (the gateway sees it as the peer)."""
        source_address = (source, 0) if source is not None else None
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=source_address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.eof = False

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def read_until(self, marker: bytes) -> bytes:
        while True:
            index = self.buffer.find(marker)
            if index >= 0:
                end = index + len(marker)
                out = bytes(self.buffer[:end])
                del self.buffer[:end]
                return out
            if not self._fill():
                raise EOFError(f"connection closed before {marker!r}; got {bytes(self.buffer[:300])!r}")

    def read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise EOFError(f"connection closed after {len(self.buffer)} of {size} bytes")
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        out = bytes(self.buffer)
        self.buffer.clear()
        return out

    def read_head(self) -> RawResponse:
        head = self.read_until(b"\r\n\r\n").decode("latin-1")
        lines = head.split("\r\n")
        version, _, rest = lines[0].partition(" ")
        status, _, reason = rest.partition(" ")
        headers = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.append((name.strip().lower(), value.strip()))
        return RawResponse(version, int(status), reason, headers)

    def read_response(self, method: str = "GET") -> RawResponse:
        """One response; an interim 1xx (other than 101) comes back on its own, without a body."""
        response = self.read_head()
        status = response.status
        if 100 <= status < 200 or method == "HEAD" or status in (204, 304):
            return response
        encoding = (response.header("transfer-encoding") or "").lower()
        length = response.header("content-length")
        if "chunked" in encoding:
            response.chunked = True
            parts = []
            while True:
                size = int(self.read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    while self.read_until(b"\r\n") != b"\r\n":  # trailers, if any
                        pass
                    break
                response.chunk_sizes.append(size)
                parts.append(self.read_exact(size))
                assert self.read_exact(2) == b"\r\n", "chunk not followed by CRLF"
            response.body = b"".join(parts)
        elif length is not None:
            response.body = self.read_exact(int(length))
        else:
            response.body = self.read_to_eof()
        return response

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> bytes:
        """Serialize an HTTP/1.1 request (Host added unless given; Content-Length for a body)."""
        lines = [f"{method} {path} HTTP/1.1"]
        given = {k.lower() for k in (headers or {})}
        if "host" not in given:
            lines.append("Host: gateway.test")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body and "content-length" not in given and "transfer-encoding" not in given:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def exchange(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> RawResponse:
        self.send(self.request(method, path, headers, body))
        return self.read_response(method)

    def closed_by_peer(self) -> bool:
        """True once the gateway closed the connection with nothing more to read (waits up to the timeout)."""
        if self.buffer:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        if data:
            self.buffer += data
            return False
        self.eof = True
        return True

    def is_open(self) -> bool:
        """True when the connection is still usable: nothing arrived and no FIN within a short poll."""
        if self.buffer or self.eof:
            return False
        self.sock.settimeout(0.2)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        except ConnectionResetError:
            return False
        finally:
            self.sock.settimeout(DEFAULT_TIMEOUT)
        self.buffer += data
        return False


# -- memory of a process ----------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def bytes_read(pid: int) -> int:
    """Bytes a process has read through read()-like calls so far (sockets included): /proc/<pid>/io rchar."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError(f"no rchar for pid {pid}")


def wait_until_steady(read: Any, samples: int = 5, interval: float = 0.05, timeout: float = 10.0) -> int:
    """Poll ``read()`` until it returns the same value ``samples`` times in a row; that value."""
    deadline = time.monotonic() + timeout
    last, same = read(), 0
    while same < samples:
        if time.monotonic() > deadline:
            raise AssertionError(f"value still changing after {timeout}s (last {last})")
        time.sleep(interval)
        value = read()
        same = same + 1 if value == last else 0
        last = value
    return last


class RssSampler:
    """Samples a process's resident set size on a thread until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
                self.samples += 1
            except (OSError, RuntimeError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# -- a websocket echo upstream ------------------------------------------------------------------------
class WebSocketEcho:
    """A real websocket server (the `websockets` library, sync API) on a thread.

    Each connection first gets the text message ``hello``, then every message is echoed back.
    The request line/headers it saw and the close code it got are recorded.
    """

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.close_codes: list[int | None] = []
        self.closed = threading.Event()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def _handler(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        self.paths.append(ws.request.path)
        self.headers.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        try:
            ws.send("hello")
            for message in ws:
                ws.send(message)
        except ConnectionClosed:
            pass
        finally:
            self.close_codes.append(ws.close_code)
            self.closed.set()

    def __enter__(self) -> WebSocketEcho:
        from websockets.sync.server import serve

        self._server = serve(self._handler, "127.0.0.1", 0, compression=None, max_size=None)
        self.port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join(5)
