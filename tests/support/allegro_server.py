"""A local imitation of the Allegro endpoints the order-events poller uses, on a real socket.

- ``POST /auth/oauth/token``: ``grant_type=refresh_token`` with HTTP Basic ``client_id:secret``;
  every refresh issues a new access token *and* a new refresh token, and the old refresh token
  stops working (rotation), as the poller must expect.
- ``GET /order/event-stats``: ``{"latestEvent": {"id", "occurredAt"}}`` (null when there is none).
- ``GET /order/events?from=&type=&limit=``: the events after ``from`` (all without it), filtered
  by type, at most ``limit`` (default 100), as ``{"events": [...]}``.

Both API endpoints want ``Authorization: Bearer <a token it issued>`` and the Allegro media type.
``faults`` queues misbehaviour for the next ``/order/events`` requests: ``"401"`` (an issued
token refused once), ``"429"`` (throttled, ``Retry-After: 1``) and ``"garbage"`` (200, not JSON).
"""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

MEDIA_TYPE = "application/vnd.allegro.public.v1+json"
CLIENT_ID = "apigate-test-client"
CLIENT_SECRET = "apigate-test-secret"
FIRST_REFRESH_TOKEN = "refresh-0"


def order_event(number: int, event_type: str = "READY_FOR_PROCESSING") -> dict[str, Any]:
    """An order event shaped as Allegro documents it."""
    return {
        "id": f"MTAwMDAw{number:08d}",
        "occurredAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(1_700_000_000 + number)),
        "type": event_type,
        "order": {
            "seller": {"id": "40507"},
            "buyer": {
                "id": f"buyer-{number}",
                "email": f"b{number}@example.test",
                "login": "x",
                "guest": False,
            },
            "lineItems": [{"id": f"line-{number}", "offer": {"id": "7762061106", "name": "Mug"}}],
            "checkoutForm": {"id": f"29738e61-7f6a-11e8-ac45-{number:012d}"},
        },
    }


class AllegroServer:
    def __init__(self, access_lifetime: int = 43199) -> None:
        self.access_lifetime = access_lifetime
        self.events: list[dict[str, Any]] = []
        self.faults: deque[str] = deque()
        self.refresh_token = FIRST_REFRESH_TOKEN
        self.access_tokens: set[str] = set()
        self.refreshes = 0
        self.refused_refreshes = 0
        self.stats_calls = 0
        self.event_queries: list[tuple[float, dict[str, list[str]]]] = []  # (monotonic time, query)
        self.lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> AllegroServer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_events(self, count: int, event_type: str = "READY_FOR_PROCESSING") -> list[str]:
        """Append ``count`` new events to the journal; returns their ids."""
        with self.lock:
            made = [order_event(next(self._numbers), event_type) for _ in range(count)]
            self.events += made
        return [event["id"] for event in made]

    # -- answers (called on the server's threads, under the lock) ------------------------------------
    def token(self, authorization: str, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if authorization != f"Basic {expected}":
            return 401, {"error": "invalid_client"}
        if form.get("grant_type") != ["refresh_token"] or form.get("refresh_token") != [self.refresh_token]:
            self.refused_refreshes += 1
            return 400, {"error": "invalid_grant", "error_description": "Invalid refresh token"}
        self.refreshes += 1
        access, self.refresh_token = f"access-{self.refreshes}", f"refresh-{self.refreshes}"
        self.access_tokens.add(access)
        return 200, {
            "access_token": access,
            "token_type": "bearer",
            "refresh_token": self.refresh_token,
            "expires_in": self.access_lifetime,
            "scope": "allegro:api:orders:read",
            "allegro_api": True,
            "jti": f"jti-{self.refreshes}",
        }

    def api(self, authorization: str, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        if not authorization.startswith("Bearer ") or authorization[7:] not in self.access_tokens:
            return 401, {"error": "invalid_token"}
        if path == "/order/event-stats":
            self.stats_calls += 1
            latest = self.events[-1] if self.events else None
            return 200, {"latestEvent": latest and {"id": latest["id"], "occurredAt": latest["occurredAt"]}}
        if path != "/order/events":
            return 404, {"errors": [{"code": "NOT_FOUND"}]}
        self.event_queries.append((time.monotonic(), query))
        fault = self.faults.popleft() if self.faults else None
        if fault == "401":
            return 401, {"error": "invalid_token"}
        if fault == "429":
            return 429, {"errors": [{"code": "TOO_MANY_REQUESTS"}]}
        if fault == "garbage":
            return 200, b"<html>502 Bad Gateway</html>"
        ids = [event["id"] for event in self.events]
        start = ids.index(query["from"][0]) + 1 if "from" in query else 0
        wanted = set(query.get("type", ()))
        after = [e for e in self.events[start:] if not wanted or e["type"] in wanted]
        return 200, {"events": after[: int(query.get("limit", ["100"])[0])]}


def _handler_for(allegro: AllegroServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if urlsplit(self.path).path != "/auth/oauth/token":
                return self._answer(404, {"error": "not_found"})
            with allegro.lock:
                status, answer = allegro.token(self.headers.get("authorization", ""), parse_qs(body.decode()))
            self._answer(status, answer, "application/json")

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if self.headers.get("accept") != MEDIA_TYPE:
                return self._answer(406, {"errors": [{"code": "NOT_ACCEPTABLE"}]})
            with allegro.lock:
                status, answer = allegro.api(
                    self.headers.get("authorization", ""), parts.path, parse_qs(parts.query)
                )
            self._answer(status, answer, MEDIA_TYPE, [("retry-after", "1")] if status == 429 else [])

        def _answer(
            self, status: int, answer: Any, content_type: str = MEDIA_TYPE, extra: list | None = None
        ) -> None:
            body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            for name, value in extra or ():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
