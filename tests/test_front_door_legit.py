"""Legitimate traffic that the front-door limits (head measurement, chunk framing, body timeouts)
must still serve: large heads that arrive in several reads, large response heads flushed before
their body, chunked uploads that an upstream answers early, uploads that the upstream reads
slowly, and bodies still arriving after an early answer.

The scripted upstream is a raw socket server so that each test controls exactly when bytes move.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.naive_upstream import NaiveUpstream
from tests.support.proxy_http import RawConnection, running_gateway

# A response head of this size is well under the gateway's 64 KiB limit for response heads.
LARGE_RESPONSE_HEAD = 40_000
# A request head of this size is well under the default limits.max_header_bytes (32 KiB).
LARGE_REQUEST_HEAD = 20_000


def header_lines(name: bytes, total: int) -> bytes:
    """About ``total`` bytes of header lines of 1000 bytes each (``name0``, ``name1``, ...)."""
    return b"".join(b"%s%d: %s\r\n" % (name, index, b"v" * 990) for index in range(total // 1000))


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The request head the gateway sent (without the blank line) and what followed it."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the gateway closed before sending a whole head")
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


class ScriptedUpstream:
    """A raw HTTP/1.1 upstream; the first path segment of a request picks what it does."""

    def __init__(self) -> None:
        self.body_go = threading.Event()  # a test sets it to let a held-back response body go
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.behaviours: dict[bytes, Callable[[socket.socket, bytes, bytes], None]] = {
            b"big-head-flushed": self.big_head_flushed,
            b"big-head-in-pieces": self.big_head_in_pieces,
            b"early": self.early,
            b"slow-reader": self.slow_reader,
            b"mute": self.mute,
        }
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            try:
                head, rest = read_head(sock)
                behaviour = head.split(b" ")[1].split(b"/")[1]
                self.behaviours[behaviour](sock, head, rest)
            except OSError:
                pass

    def stop(self) -> None:
        self.listener.close()

    def big_head_flushed(self, sock: socket.socket, head: bytes, rest: bytes) -> None:
        """A chunked response whose large head is sent on its own; the body waits for ``body_go``,
        as a streaming upstream's would."""
        sock.sendall(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
            + header_lines(b"x-policy", LARGE_RESPONSE_HEAD)
            + b"\r\n"
        )
        if self.body_go.wait(10):
            sock.sendall(b"5\r\nhello\r\n0\r\n\r\n")

    def big_head_in_pieces(self, sock: socket.socket, head: bytes, rest: bytes) -> None:
        """A large response head written a line at a time, as a server that flushes each header does."""
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n")
        for index in range(LARGE_RESPONSE_HEAD // 1000):
            sock.sendall(b"x-policy%d: %s\r\n" % (index, b"v" * 990))
            time.sleep(0.002)
        sock.sendall(b"\r\nhello")

    def early(self, sock: socket.socket, head: bytes, rest: bytes) -> None:
        """Answers at once, before the request body is complete, and reads the rest of it."""
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        sock.settimeout(10)
        while sock.recv(65536):
            pass

    def slow_reader(self, sock: socket.socket, head: bytes, rest: bytes) -> None:
        """Takes 3 s before it reads the body (busy with something else), then reads it all."""
        time.sleep(3)
        received = len(rest)
        while received < content_length(head):
            data = sock.recv(1 << 20)
            if not data:
                return
            received += len(data)
        answer = b"%d" % received
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))

    def mute(self, sock: socket.socket, head: bytes, rest: bytes) -> None:
        """Reads whatever comes and never answers."""
        sock.settimeout(10)
        while sock.recv(65536):
            pass


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    server = ScriptedUpstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(
    naive: NaiveUpstream, scripted: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    naive_target = f"http://127.0.0.1:{naive.port}"
    scripted_target = f"http://127.0.0.1:{scripted.port}"
    config = {
        "timeouts": {"body_idle": "1s"},
        "routes": [
            {
                "path": "/deny/*",
                "target": naive_target,
                "policies": {"request-termination": {"status": 401, "message": "no"}},
            },
            {"path": "/naive/*", "target": naive_target},
            {"path": "/mute/*", "target": scripted_target, "timeout": "1s"},
            {"path": "/*", "target": scripted_target, "timeout": "30s"},
        ],
    }
    with running_gateway(tmp_path_factory.mktemp("review-findings"), config) as gw:
        yield gw


def test_a_request_head_under_the_limit_is_served_when_it_arrives_in_several_reads(
    gateway: GatewayProcess,
) -> None:
    """20 KB of headers, under the 32 KiB limit, sent a line at a time as a client on a real
    network delivers them: each read must be counted once, not once per read and again per line."""
    with RawConnection(gateway.port) as conn:
        try:
            conn.send(b"GET /naive/large-cookies HTTP/1.1\r\nHost: t\r\n")
            for index in range(LARGE_REQUEST_HEAD // 1000):
                conn.send(b"x-cookie%d: %s\r\n" % (index, b"v" * 990))
                time.sleep(0.002)
            conn.send(b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway answered before the head was whole: the answer says why
        assert conn.read_response().status == 200


def test_a_large_response_head_flushed_before_its_chunked_body_is_passed_on_whole(
    gateway: GatewayProcess, scripted: ScriptedUpstream
) -> None:
    """A 40 KB response head (under the 64 KiB limit) read without body bytes is a head, not
    chunk framing: the body that follows must still reach the client."""
    scripted.body_go.clear()
    with RawConnection(gateway.port) as conn:
        conn.send(b"GET /big-head-flushed HTTP/1.1\r\nHost: t\r\n\r\n")
        head = conn.read_head()
        assert head.status == 200
        scripted.body_go.set()
        assert conn.read_until(b"0\r\n\r\n") == b"5\r\nhello\r\n0\r\n\r\n"


def test_a_response_head_under_the_limit_is_passed_on_when_it_arrives_in_pieces(
    gateway: GatewayProcess,
) -> None:
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", "/big-head-in-pieces")
        assert response.status == 200
        assert response.body == b"hello"


def test_a_chunked_upload_answered_early_by_the_upstream_gets_no_second_answer(
    gateway: GatewayProcess,
) -> None:
    """After the upstream's early answer the rest of the chunked body is read and dropped; that
    body is data, not framing, so no 400 may follow the answer, and the connection goes on."""
    with RawConnection(gateway.port) as conn:
        conn.send(b"POST /early HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert conn.read_response().status == 200
        try:
            for _ in range(40):
                conn.send(b"400\r\n" + b"x" * 1024 + b"\r\n")
            conn.send(b"0\r\n\r\n")
            conn.send(b"GET /naive/next HTTP/1.1\r\nHost: t\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            answer = conn.read_response()
        except EOFError as exc:
            pytest.fail(f"the connection ended instead of serving the next request: {exc}")
        assert answer.status == 200, f"an unsolicited {answer.status} followed the answer: {answer.body!r}"


def test_an_upload_the_upstream_reads_slowly_is_not_blamed_on_the_client(gateway: GatewayProcess) -> None:
    """The client sends as fast as it can; the gateway stops reading because the upstream is not
    taking the body for 3 s. That silence is the gateway's own, not body_idle (1 s here)."""
    size = 32 << 20  # more than the socket buffers hold, so the gateway must pause the client
    with RawConnection(gateway.port, timeout=30) as conn:
        conn.send(b"POST /slow-reader HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        sender = threading.Thread(target=_send_quietly, args=(conn.sock, b"x" * size), daemon=True)
        sender.start()
        response = conn.read_response()
        assert response.status == 200, response.body
        assert response.body == b"%d" % size


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the gateway closed: the test sees it in the answer
        sock.sendall(data)


def test_a_body_still_arriving_after_an_early_answer_keeps_the_connection(gateway: GatewayProcess) -> None:
    """A policy answers 401 before the (small) body is read; the client goes on sending it at a
    steady 1.2 kB/s, never silent for body_idle (1 s). The body is read and dropped, then the
    connection serves the next request."""
    with RawConnection(gateway.port) as conn:
        conn.send(b"POST /deny/x HTTP/1.1\r\nHost: t\r\nContent-Length: 4500\r\n\r\n")
        assert conn.read_response().status == 401
        try:
            for _ in range(15):
                conn.send(b"y" * 300)
                time.sleep(0.25)
            conn.send(b"GET /naive/next HTTP/1.1\r\nHost: t\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert conn.read_response().status == 200


def test_one_timed_out_request_counts_one_timeout(gateway: GatewayProcess) -> None:
    """The sweep checks the upstream timeouts and then the body timeouts of the same exchange:
    a request the route timeout ended must not be counted twice."""
    with RawConnection(gateway.port) as conn:
        before = conn.exchange("GET", "/stats").json()["timeouts"]
    with RawConnection(gateway.port) as conn:
        conn.send(b"POST /mute/x HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        # The body never finished: the route's timeout is the client's (408), counted once.
        assert conn.read_response().status == 408
    with RawConnection(gateway.port) as conn:
        after = conn.exchange("GET", "/stats").json()["timeouts"]
    assert after - before == 1
