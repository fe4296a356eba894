"""Helpers for the end-to-end tests of errors, routing, lifecycle and the CLI.

- ``Client``: one TCP connection speaking HTTP/1.1 by hand, so a test controls every byte it
  sends (smuggling attempts, broken heads) and sees exactly what comes back, including whether
  the gateway closed the connection afterwards.
- ``wait_until``: poll a real condition until a deadline instead of sleeping and hoping.
- ``Launched``: a gateway process started by hand (own cwd, env, no ``listen`` key), for the
  tests that cannot go through the ``start_gateway`` fixture.
- ``children_of``: a process's children, read from /proc.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from tests.support.gateway import stop_process

T = TypeVar("T")


class PeerClosed(Exception):
    """The gateway closed the connection before a whole response arrived."""


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    def json(self) -> Any:
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers!r} {self.body[:300]!r}>"


class Client:
    """A keep-alive HTTP/1.1 connection to ``127.0.0.1:port``."""

    def __init__(self, port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | Iterable[tuple[str, str]] | None = None,
        body: bytes = b"",
        host: str | None = "gateway.test",
    ) -> None:
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        names = {k.lower() for k, _ in pairs}
        if host is not None and "host" not in names:
            pairs.insert(0, ("Host", host))
        if body and "content-length" not in names and "transfer-encoding" not in names:
            pairs.append(("Content-Length", str(len(body))))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs) + "\r\n"
        self.send(head.encode("latin-1") + body)

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | Iterable[tuple[str, str]] | None = None,
        body: bytes = b"",
        host: str | None = "gateway.test",
    ) -> Response:
        self.send_request(method, path, headers, body, host)
        return self.read_response(method)

    # -- reading ------------------------------------------------------------------------------
    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError as exc:
            raise PeerClosed("connection reset") from exc
        if not data:
            raise PeerClosed("connection closed")
        self.buf += data

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._fill()
        out, _, self.buf = self.buf.partition(marker)
        return out

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_response(self, method: str = "GET") -> Response:
        while True:
            head = self._read_until(b"\r\n\r\n").decode("latin-1")
            status_line, *lines = head.split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            headers = []
            for line in lines:
                name, _, value = line.partition(":")
                headers.append((name.strip().lower(), value.strip()))
            if 100 <= status < 200 and status != 101:
                continue  # interim answer
            break
        response = Response(status, headers, b"")
        if method == "HEAD" or status in (101, 204, 304):
            return response
        te = response.header("transfer-encoding")
        length = response.header("content-length")
        if te is not None and "chunked" in te.lower():
            body = b""
            while True:
                size = int(self._read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self._read_until(b"\r\n")  # no trailers expected
                    break
                body += self._read_exact(size)
                self._read_exact(2)
            response.body = body
        elif length is not None:
            response.body = self._read_exact(int(length))
        else:
            while True:
                try:
                    self._fill()
                except PeerClosed:
                    break
            response.body, self.buf = self.buf, b""
        return response

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True if the gateway closes (or resets) the connection within ``timeout``."""
        if self.buf:
            raise AssertionError(f"unread bytes after the response: {self.buf[:200]!r}")
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        if data:
            raise AssertionError(f"unexpected bytes instead of a close: {data[:200]!r}")
        return True


def request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | Iterable[tuple[str, str]] | None = None,
    body: bytes = b"",
    host: str | None = "gateway.test",
    timeout: float = 10.0,
) -> Response:
    """One request on a new connection."""
    with Client(port, timeout=timeout) as client:
        return client.request(method, path, headers, body, host)


def get(port: int, path: str, **kwargs: Any) -> Response:
    return request(port, "GET", path, **kwargs)


def assert_error(response: Response, status: int, reason: str | None = None) -> dict[str, Any]:
    """The gateway's own error shape: JSON ``{error, request_id}`` matching X-Request-ID, and a
    ``reason`` code where the gateway gives one (``reason``: the code it must be)."""
    assert response.status == status, response
    assert (response.header("content-type") or "").startswith("application/json"), response
    payload = response.json()
    assert set(payload) - {"reason"} == {"error", "request_id"}, payload
    if reason is not None:
        assert payload.get("reason") == reason, payload
    assert isinstance(payload["error"], str) and payload["error"], payload
    assert payload["request_id"], payload
    assert response.header("x-request-id") == payload["request_id"], response
    return payload


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, message: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, PeerClosed, AssertionError) as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {message or predicate}: {last_exc!r}"
            )
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ClosedPort:
    """A loopback port that refuses connections: bound (so no one else gets it) but not listening."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()


def port_refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def apigate_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "apigate", *args]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without variables that would change which config is used."""
    env = {k: v for k, v in os.environ.items() if k not in ("ROUTES_CONFIG", "PORT")}
    env.update(extra)
    return env


class Launched:
    """``python -m apigate <args>`` started by hand, output to a log file, stopped at teardown."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, port: int, timeout: float = 15.0) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_until(up, timeout, message=f"a listener on port {port}")

    def stop(self) -> int | None:
        return stop_process(self.proc, self.log)


def children_of(pid: int) -> set[int]:
    """Live (not zombie) child processes of ``pid``, from /proc."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: parse after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == pid and state != "Z":
            found.add(int(entry))
    return found


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


class Blackhole:
    """A loopback listener that never accepts, with its backlog filled: a connect to it times out.

    This gives a real connect timeout without sending anything off the machine. ``fill`` says
    whether the kernel really stopped completing handshakes.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fill(self, attempts: int = 64) -> bool:
        for _ in range(attempts):
            sock = socket.socket()
            sock.settimeout(0.3)
            try:
                sock.connect(("127.0.0.1", self.port))
            except TimeoutError:
                sock.close()
                return True
            except OSError:
                sock.close()
                return False
            self.held.append(sock)
        return False

    def close(self) -> None:
        for sock in self.held:
            sock.close()
        self.listener.close()
