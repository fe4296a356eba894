"""An upstream that answers with broken or hostile HTTP, to test what the gateway passes on.

Each request is answered by the script its path names (see ``SCRIPTS``); a script writes raw
bytes to the socket and says whether the connection may serve another request. Requests are
read with a minimal head reader: the gateway is the only client, and it frames what it sends.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

# A response head or chunk extension that never ends is written up to this much, then dropped.
ENDLESS_LIMIT = 8 * 1024 * 1024
INTERIM_FLOOD = 20_000


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


def _write_endless(sock: socket.socket, start: bytes) -> bool:
    """``start`` then filler without a line end, until the gateway stops reading or the limit."""
    block = b"a" * 65536
    try:
        sock.sendall(start)
        for _ in range(ENDLESS_LIMIT // len(block)):
            sock.sendall(block)
    except OSError:
        pass
    return False


def _write(data: bytes, keep: bool = False) -> Callable[[socket.socket], bool]:
    def script(sock: socket.socket) -> bool:
        sock.sendall(data)
        return keep

    return script


SCRIPTS: dict[str, Callable[[socket.socket], bool]] = {
    "/evil/content-length-and-chunked": _write(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "/evil/bad-chunk": _write(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
    ),
    "/evil/endless-head": lambda sock: _write_endless(sock, b"HTTP/1.1 200 OK\r\nx-endless: "),
    "/evil/endless-chunk-extension": lambda sock: _write_endless(
        sock, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext="
    ),
    # Five bytes promised, then a whole second response: a proxy that reuses this connection
    # without noticing would hand the extra answer to the next request.
    "/evil/longer-than-length": _write(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello" + _ok(b"smuggled"), True
    ),
    # The same with the start of a response whose body is still owed: a parser left inside it
    # would take the next request's answer for the rest of that body.
    "/evil/longer-than-length-partial": _write(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
        + b"HTTP/1.1 200 OK\r\ncontent-length: 30\r\n\r\nstolen:",
        True,
    ),
    "/evil/second": _write(_ok(b"second"), True),
    "/evil/unasked-switch": _write(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\ntunnel-bytes"
    ),
    "/evil/switches-anyway": _write(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\ntunnel-bytes"
    ),
    "/evil/interim-flood": _write(b"HTTP/1.1 102 Processing\r\n\r\n" * INTERIM_FLOOD + _ok(b"ok"), True),
}


def read_request(conn: socket.socket, buffer: bytes) -> tuple[bytes, bytes, bytes] | None:
    """The next request's head and Content-Length body (the gateway sends no other kind here), and
    what follows them; None when the connection ends first."""
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buffer) < length:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    return head, buffer[:length], buffer[length:]


@dataclass
class HostileUpstream:
    """A threaded raw-socket server on 127.0.0.1; ``paths`` lists the targets it was asked for."""

    port: int = 0
    paths: list[str] = field(default_factory=list)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        buffer = b""
        with conn:
            try:
                while True:
                    read = read_request(conn, buffer)
                    if read is None:
                        return
                    head, _, buffer = read
                    target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
                    self.paths.append(target)
                    script = SCRIPTS.get(target.partition("?")[0], _write(_ok(b"plain"), True))
                    if not script(conn):
                        return
            except OSError:
                return
