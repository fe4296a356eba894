"""A small OAuth 2.0 authorization server for tests: an RFC 7662 introspection endpoint on
127.0.0.1 (a thread, so a gateway process and an in-process event loop can both reach it).

Tokens are registered with the introspection document to return (``active()``/``inactive()``),
or with a raw HTTP response (to test what the gateway does with a broken server). The server
checks the caller's HTTP Basic client credentials, records every form it received and counts
the calls per token; ``delay`` holds every answer back (to make concurrent callers overlap).
"""

from __future__ import annotations

import base64
import threading
import time
from typing import Any
from urllib.parse import parse_qs, unquote

from tests.support.threaded_server import JsonHandler, ThreadedServer

CLIENT_ID = "gateway:client"  # a colon, which RFC 6749 §2.3.1 form-encoding must carry through
CLIENT_SECRET = "s3cret/with+special chars"


class IntrospectionServer(ThreadedServer):
    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Any] | bytes] = {}
        self.calls: dict[str, int] = {}
        self.forms: list[dict[str, list[str]]] = []
        self.delay = 0.0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/oauth2/introspect"

    def policy(self, **overrides: Any) -> dict[str, Any]:
        """An oauth2-introspection policy config for this server."""
        return {
            "introspection_url": self.url,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            **overrides,
        }

    def active(self, token: str, **claims: Any) -> str:
        document = {"active": True, "exp": int(time.time()) + 600, "token_type": "Bearer", **claims}
        with self._lock:
            self.answers[token] = {k: v for k, v in document.items() if v is not None}
        return token

    def inactive(self, token: str) -> str:
        with self._lock:
            self.answers[token] = {"active": False}
        return token

    def raw(self, token: str, response: bytes) -> str:
        with self._lock:
            self.answers[token] = response
        return token

    def calls_for(self, token: str) -> int:
        with self._lock:
            return self.calls.get(token, 0)

    def start(self) -> IntrospectionServer:
        server = self

        class Handler(JsonHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real authorization servers do

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                form = parse_qs(self.rfile.read(length).decode(), keep_blank_values=True)
                if self.path != "/oauth2/introspect":
                    self.send_json(404, {"error": "not_found"})
                    return
                if not _client_authenticated(self.headers.get("authorization")):
                    self.send_json(401, {"error": "invalid_client"})
                    return
                token = (form.get("token") or [""])[0]
                with server._lock:
                    server.forms.append(form)
                    server.calls[token] = server.calls.get(token, 0) + 1
                    answer = server.answers.get(token, {"active": False})
                    delay = server.delay
                if delay:
                    time.sleep(delay)
                if isinstance(answer, bytes):
                    self.wfile.write(answer)
                    self.close_connection = True
                else:
                    self.send_json(200, answer)

        self.listen(Handler)
        return self


def _client_authenticated(authorization: str | None) -> bool:
    """HTTP Basic with the form-encoded client id and secret (RFC 6749 §2.3.1)."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    user, _, password = base64.b64decode(encoded).decode().partition(":")
    return unquote(user) == CLIENT_ID and unquote(password) == CLIENT_SECRET
