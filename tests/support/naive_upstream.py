"""A deliberately naive upstream: Python's http.server with keep-alive, which ignores Upgrade and
reads whatever follows a request as the next request, as many real backends do. Anything the
gateway lets through unframed shows up in its record."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.support.threaded_server import ThreadedServer


class NaiveUpstream(ThreadedServer):
    """Answers every request 200 with a short body; records each request line, headers and body size."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.connections = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with owner.lock:
                    owner.connections += 1

            def handle_one_request(self) -> None:
                self.raw_requestline = self.rfile.readline(65537)
                if not self.raw_requestline or not self.parse_request():
                    self.close_connection = True
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                if "chunked" in headers.get("transfer-encoding", ""):
                    while size := int(self.rfile.readline().split(b";")[0] or b"0", 16):
                        self.rfile.read(size + 2)
                    while self.rfile.readline() not in (b"\r\n", b""):  # trailers
                        pass
                elif length := int(headers.get("content-length") or 0):
                    self.rfile.read(length)
                with owner.lock:
                    owner.seen.append((self.command, self.path, headers))
                body = b'{"ok":true}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.listen(Handler)

    def paths(self) -> list[str]:
        with self.lock:
            return [f"{method} {path}" for method, path, _ in self.seen]

    def wait_for(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen) < count:
            assert time.monotonic() < deadline, f"upstream saw {self.paths()}, expected {count} requests"
            time.sleep(0.01)
