"""An upstream serving resources whose representation a test sets and changes, and that answers
conditional requests as an origin does (RFC 9110 §13): If-None-Match against the resource's
ETag, else If-Modified-Since against its Last-Modified, a match being a 304.

``resources[path]`` is a ``Resource`` (body, ETag, Last-Modified, Cache-Control, more fields);
an unknown path is 404. ``mode`` is read per request: ``"ok"``, ``"status:503"`` (that status,
with a body), or ``"hold"`` (the answer waits for ``release()``). As a ``FaultyUpstream``,
``stop()`` closes the listening socket and every connection (the upstream is then down:
connections are refused) and ``start()`` listens again on the same port. Every request is
recorded in ``requests`` (path, lowercase header names) with the status it got. Dates come from
``clock`` (seconds since the epoch), the test's clock, so a gateway whose cache runs on the same
clock ages responses as the test says.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.support.faulty_upstream import FaultyUpstream, _Handler


@dataclass
class Resource:
    body: bytes
    etag: str | None = None
    last_modified: float | None = None
    cache_control: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Served:
    path: str
    headers: dict[str, str]
    status: int = 0


def http_date(when: float) -> str:
    return email.utils.formatdate(when, usegmt=True)


class _ResourceHandler(_Handler):
    server: ResourceUpstream

    def on_message_complete(self) -> None:
        served = Served(self.url.decode("latin-1").partition("?")[0], dict(self.headers))
        self.server.requests.append(served)
        if self.server.mode == "hold":
            self.server.held.append((self, served))
            return
        self.answer(served)

    def answer(self, served: Served) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        status, fields, body = self.server.respond(served)
        served.status = status
        head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields)
        if status not in (204, 304):
            head += f"content-length: {len(body)}\r\n"
        transport.write(head.encode("latin-1") + b"\r\n" + body)


class ResourceUpstream(FaultyUpstream):
    handler = _ResourceHandler

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        super().__init__("resources")
        self.clock = clock
        self.resources: dict[str, Resource] = {}
        self.requests: list[Served] = []
        self.held: list[tuple[_ResourceHandler, Served]] = []

    def respond(self, served: Served) -> tuple[int, list[tuple[str, str]], bytes]:
        """The status, fields and body for this request, as an origin with conditional requests."""
        fields = [("date", http_date(self.clock()))]
        if self.mode.startswith("status:"):
            return int(self.mode.partition(":")[2]), fields, b'{"error": "unavailable"}'
        resource = self.resources.get(served.path)
        if resource is None:
            return 404, fields, b"{}"
        if resource.etag is not None:
            fields.append(("etag", resource.etag))
        if resource.last_modified is not None:
            fields.append(("last-modified", http_date(resource.last_modified)))
        if resource.cache_control is not None:
            fields.append(("cache-control", resource.cache_control))
        fields += resource.headers
        if self._not_modified(served.headers, resource):
            return 304, fields, b""
        return 200, [*fields, ("content-type", "text/plain")], resource.body

    @staticmethod
    def _not_modified(headers: dict[str, str], resource: Resource) -> bool:
        if_none_match = headers.get("if-none-match")
        if if_none_match is not None:
            tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
            return resource.etag is not None and resource.etag.removeprefix("W/") in tags
        since = headers.get("if-modified-since")
        if since is None or resource.last_modified is None:
            return False
        return resource.last_modified <= email.utils.parsedate_to_datetime(since).timestamp()

    def calls(self, path: str) -> list[Served]:
        return [served for served in list(self.requests) if served.path == path]

    def release(self) -> None:
        """Answer every held request, and the ones to come."""

        async def run() -> None:
            self.mode = "ok"
            held, self.held = self.held, []
            for handler, served in held:
                handler.answer(served)

        self._call(run())

    def start(self) -> ResourceUpstream:
        super().start()
        return self
