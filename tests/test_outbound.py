"""The outbound HTTP client against real servers on 127.0.0.1: asyncio servers started in each
test's loop that answer with exact bytes, count the connections they accept, and record what
they were sent."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from apigate.outbound import HttpClient, OutboundError, Response
from tests.support.tls import self_signed


def ok(body: bytes = b"hello", *headers: bytes) -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class Seen:
    def __init__(self, head: bytes, body: bytes, connection: int) -> None:
        self.head = head
        self.body = body
        self.connection = connection  # which accepted connection carried it (1, 2, ...)

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode()

    def header(self, name: str) -> str | None:
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


class Hangup:
    """An answer that writes ``data`` (maybe nothing) and then closes the connection."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data


# What the server does with a request: bytes to send back (keeping the connection), a Hangup,
# or a coroutine for either (to hold a response back).
Answer = Callable[[Seen], bytes | Hangup | Awaitable[bytes | Hangup]]


class Server:
    """An HTTP/1.1 server in the running loop that answers with ``answer``; counts accepted and
    closed connections."""

    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.accepts = 0
        self.closes = 0
        self.requests: list[Seen] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._handlers:  # handlers still reading or holding an answer back
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts += 1
        number = self.accepts
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen = Seen(head, b"", number)
                length = seen.header("content-length")
                if length:
                    seen.body = await reader.readexactly(int(length))
                self.requests.append(seen)
                answer = self.answer(seen)
                if not isinstance(answer, bytes | Hangup):
                    answer = await answer
                if isinstance(answer, Hangup):
                    writer.write(answer.data)
                    await writer.drain()
                    break
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self.closes += 1
            self._handlers.discard(task)
            writer.close()


def run(main: Callable[[], Awaitable[object]]) -> object:
    return asyncio.run(main())


async def until(condition: Callable[[], bool], limit: float = 5.0) -> None:
    """Poll ``condition`` on the loop until it holds; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {limit}s")
        await asyncio.sleep(0.01)


async def fetch(answer: Answer, method: str = "GET", max_body: int = 1 << 20) -> Response | OutboundError:
    """One request to a fresh server; the response, or the OutboundError it raised."""
    async with Server(answer) as server:
        client = HttpClient()
        try:
            return await client.request(method, server.url + "/path", max_body=max_body)
        except OutboundError as exc:
            return exc
        finally:
            await client.close()


# -- responses ----------------------------------------------------------------------------------------
def test_status_headers_body_and_the_request_as_sent() -> None:
    async def main() -> None:
        answer = b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Many: 1\r\nX-Many: 2\r\n\r\nmade"
        async with Server(lambda seen: answer) as server:
            client = HttpClient()
            response = await client.request(
                "POST",
                server.url + "/items?x=1&y=%20",
                headers=[(b"Content-Type", b"application/json"), (b"X-Trace", b"abc")],
                body=b'{"a":1}',
            )
            await client.close()
        assert response.status == 201
        assert response.body == b"made"
        assert response.headers == [(b"content-length", b"4"), (b"x-many", b"1"), (b"x-many", b"2")]
        assert response.header(b"X-Many") == b"1"
        assert response.header(b"x-missing") is None
        seen = server.requests[0]
        assert seen.request_line == "POST /items?x=1&y=%20 HTTP/1.1"
        assert seen.header("host") == server.url.removeprefix("http://")
        assert seen.header("content-type") == "application/json"
        assert seen.header("x-trace") == "abc"
        assert seen.header("content-length") == "7" and seen.body == b'{"a":1}'
        assert seen.header("user-agent").startswith("apigate/")

    run(main)


def test_chunked_and_close_delimited_bodies() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
    response = run(lambda: fetch(lambda seen: chunked))
    assert isinstance(response, Response) and response.body == b"abcde"

    # The server sends a head without framing and the body, then hangs up.
    response = run(lambda: fetch(lambda seen: Hangup(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")))
    assert isinstance(response, Response) and response.body == b"until the end", response


def test_head_has_no_body_and_interim_answers_are_skipped() -> None:
    async def main() -> None:
        def answer(seen: Seen) -> bytes:
            if seen.request_line.startswith("HEAD"):
                return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
            return b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + ok(b"final")

        async with Server(answer) as server:
            client = HttpClient()
            head = await client.request("HEAD", server.url)
            assert head.status == 200 and head.body == b"" and head.header(b"content-length") == b"1000"
            after = await client.request("GET", server.url)
            await client.close()
        assert after.status == 200 and after.body == b"final"
        assert after.header(b"link") is None
        assert server.accepts == 1  # the HEAD response left the connection reusable

    run(main)


# -- connections ----------------------------------------------------------------------------------------
def test_keep_alive_reuses_one_connection() -> None:
    async def main() -> None:
        async with Server(lambda seen: ok()) as server:
            client = HttpClient()
            for _ in range(5):
                assert (await client.request("GET", server.url)).body == b"hello"
            await client.close()
            await until(lambda: server.closes == 1)
        assert server.accepts == 1

    run(main)


def test_connection_close_is_honoured() -> None:
    async def main() -> None:
        async with Server(lambda seen: ok(b"bye", b"Connection: close")) as server:
            client = HttpClient()
            for _ in range(3):
                assert (await client.request("GET", server.url)).body == b"bye"
            await client.close()
        assert server.accepts == 3

    run(main)


def test_without_keep_alive_every_request_has_a_connection_of_its_own() -> None:
    async def main() -> None:
        async with Server(lambda seen: ok()) as server:  # the server would keep them open
            client = HttpClient(keep_alive=False)
            for _ in range(3):
                assert (await client.request("GET", server.url)).body == b"hello"
            await until(lambda: server.closes == 3)  # closed by the client after each response
            await client.close()
        assert server.accepts == 3
        assert [seen.header("connection") for seen in server.requests] == ["close"] * 3

    run(main)


def test_http10_response_without_keep_alive_is_not_reused() -> None:
    async def main() -> None:
        async with Server(lambda seen: b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok") as server:
            client = HttpClient()
            for _ in range(2):
                assert (await client.request("GET", server.url)).body == b"ok"
            await client.close()
        assert server.accepts == 2

    run(main)


def test_pool_bound_per_origin() -> None:
    async def main() -> None:
        release = asyncio.Event()
        waiting = 0

        async def answer(seen: Seen) -> bytes:
            nonlocal waiting
            waiting += 1
            await release.wait()
            return ok(seen.request_line.encode())

        async with Server(answer) as server:
            client = HttpClient(max_connections_per_origin=2)
            calls = [
                asyncio.ensure_future(client.request("GET", f"{server.url}/{i}", timeout=10))
                for i in range(6)
            ]
            await until(lambda: waiting == 2)
            assert server.accepts == 2
            release.set()
            responses = await asyncio.gather(*calls)
            await client.close()
        assert sorted(r.body for r in responses) == [f"GET /{i} HTTP/1.1".encode() for i in range(6)]
        assert server.accepts == 2  # six requests, never more than two connections

    run(main)


def test_idle_connections_close_after_the_idle_timeout() -> None:
    async def main() -> None:
        async with Server(lambda seen: ok()) as server:
            client = HttpClient(idle_timeout=0.2)
            await client.request("GET", server.url)
            await until(lambda: server.closes == 1)
            await client.request("GET", server.url)
            await client.close()
        assert server.accepts == 2

    run(main)


def test_stale_pooled_connection_is_retried_once_for_idempotent_methods_only() -> None:
    async def main() -> None:
        # The first request on each connection is answered; the second finds it dropped (the
        # server hangs up on reading it, as one that timed out the idle connection would).
        def answer(seen: Seen) -> bytes | Hangup:
            first = sum(1 for r in server.requests if r.connection == seen.connection) == 1
            return ok() if first else Hangup()

        async with Server(answer) as server:
            client = HttpClient()
            await client.request("GET", server.url)
            response = await client.request("PUT", server.url, body=b"x")
            assert response.status == 200
            assert server.accepts == 2
            assert [r.request_line.split()[0] for r in server.requests] == ["GET", "PUT", "PUT"]

            with pytest.raises(OutboundError) as caught:
                await client.request("POST", server.url, body=b"once")
            assert caught.value.kind == "connect"
            posts = [r for r in server.requests if r.request_line.startswith("POST")]
            assert len(posts) == 1  # a POST is never sent twice...

            await client.request("GET", server.url)  # (a fresh connection into the pool)
            response = await client.request("POST", server.url, body=b"query", idempotent=True)
            assert response.status == 200  # ...unless the caller says it is safe
            await client.close()

    run(main)


def test_close_ends_idle_connections_and_later_requests() -> None:
    async def main() -> None:
        async with Server(lambda seen: ok()) as server:
            client = HttpClient()
            await client.request("GET", server.url)
            await client.close()
            await until(lambda: server.closes == 1)
            with pytest.raises(RuntimeError):
                await client.request("GET", server.url)

    run(main)


# -- failures -----------------------------------------------------------------------------------------
def test_total_timeout() -> None:
    async def main() -> None:
        never = asyncio.Event()

        async def answer(seen: Seen) -> bytes:
            await never.wait()  # never answers: the client's deadline ends the exchange
            return b""

        async with Server(answer) as server:
            client = HttpClient()
            started = time.monotonic()
            with pytest.raises(OutboundError) as caught:
                await client.request("GET", server.url, timeout=0.3)
            elapsed = time.monotonic() - started
            await client.close()
        assert caught.value.kind == "timeout"
        assert "timed out" in caught.value.message
        assert 0.3 <= elapsed < 2.0

    run(main)


def test_refused_connection() -> None:
    with socket.socket() as bound:  # bound but not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]

        async def main() -> OutboundError:
            client = HttpClient()
            try:
                with pytest.raises(OutboundError) as caught:
                    await client.request("GET", f"http://127.0.0.1:{port}/")
            finally:
                await client.close()
            return caught.value

        error = run(main)
    assert isinstance(error, OutboundError) and error.kind == "connect"
    assert f"127.0.0.1:{port}" in error.message


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n",  # refused on the header alone
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n" * 3,
    ],
    ids=["content-length", "chunked"],
)
def test_too_large_body(answer: bytes) -> None:
    error = run(lambda: fetch(lambda seen: answer, max_body=1000))
    assert isinstance(error, OutboundError) and error.kind == "too_large", error
    assert "1000" in error.message


def test_too_large_head() -> None:
    huge = b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n"
    error = run(lambda: fetch(lambda seen: huge))
    assert isinstance(error, OutboundError) and error.kind == "too_large", error


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", "protocol"),
        (b"HTTP/1.1 abc OK\r\n\r\n", "protocol"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n", "protocol"),
        (Hangup(), "connect"),  # hung up without a byte
    ],
    ids=["not-http", "two-lengths", "bad-status", "upgrade", "no-answer"],
)
def test_garbage_responses(answer: bytes | Hangup, kind: str) -> None:
    error = run(lambda: fetch(lambda seen: answer))
    assert isinstance(error, OutboundError) and error.kind == kind, error


def test_truncated_body() -> None:
    truncated = Hangup(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort")
    error = run(lambda: fetch(lambda seen: truncated))
    assert isinstance(error, OutboundError) and error.kind == "protocol", error
    assert "before the response was complete" in error.message


@pytest.mark.parametrize(
    ("method", "url", "headers"),
    [
        ("GET", "ftp://127.0.0.1/x", None),
        ("GET", "http:///nohost", None),
        ("GET", "http://user:secret@127.0.0.1/", None),
        ("GET", "http://127.0.0.1/a b", None),
        ("GET", "http://127.0.0.1:99999/", None),
        ("GE T", "http://127.0.0.1/", None),
        ("GET", "http://127.0.0.1/", [(b"X-Bad", b"a\r\nInjected: 1")]),
        ("GET", "http://127.0.0.1/", [(b"Bad Name", b"x")]),
        ("GET", "http://127.0.0.1/", [(b"Content-Length", b"5")]),
    ],
)
def test_malformed_requests_are_value_errors(method: str, url: str, headers: list | None) -> None:
    async def main() -> None:
        client = HttpClient()
        with pytest.raises(ValueError) as caught:
            await client.request(method, url, headers=headers)
        assert "secret" not in str(caught.value)

    run(main)


# -- TLS --------------------------------------------------------------------------------------------------
def test_https_with_a_trusted_self_signed_certificate(tmp_path: Path) -> None:
    certificate = self_signed()

    async def main() -> None:
        async with Server(lambda seen: ok(b"secure"), tls=certificate.server_context(tmp_path)) as server:
            client = HttpClient(ssl_context=certificate.client_context())
            for _ in range(2):
                response = await client.request("GET", server.url + "/tls")
                assert response.body == b"secure"
            await client.close()

            localhost = server.url.replace("127.0.0.1", "localhost")
            client = HttpClient(ssl_context=certificate.client_context())
            assert (await client.request("GET", localhost)).body == b"secure"
            await client.close()

            untrusting = HttpClient()  # the system's CAs do not know this certificate
            with pytest.raises(OutboundError) as caught:
                await untrusting.request("GET", server.url)
            await untrusting.close()
        assert caught.value.kind == "tls"
        # One keep-alive connection served both first requests; the refused handshake never
        # reached the server's handler.
        assert server.accepts == 2

    run(main)


def test_https_to_a_plain_http_server_is_a_tls_error() -> None:
    certificate = self_signed()

    async def main() -> None:
        async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)  # the ClientHello: answered as a plain HTTP server would
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            writer.close()

        server = await asyncio.start_server(plain, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = HttpClient(ssl_context=certificate.client_context())
        with pytest.raises(OutboundError) as caught:
            await client.request("GET", f"https://127.0.0.1:{port}/", timeout=5)
        await client.close()
        server.close()
        assert caught.value.kind == "tls", caught.value

    run(main)
