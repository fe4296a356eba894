"""Client helpers for programs that watch a gateway: request events from its admin listener.

``events()`` iterates over request events as they happen (blocking, standard library only);
``watch()`` calls ``on_request`` (and ``on_error`` for failed requests) for each, from asyncio::

    async def on_request(event):
        print(f"Request: {event['method']} {event['path']} {event['latency_ms']}ms")

    await apigate.client.watch("http://127.0.0.1:9901", token, on_request=on_request)

Each event is a dict: type, time, request_id, trace_id, method, path, route, status,
latency_ms, client_ip, consumer, upstream, bytes_in, bytes_out, error (docs/observability.md).
"""

from __future__ import annotations

import asyncio
import http.client
import inspect
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson

__all__ = ["EventsError", "events", "watch"]

Callback = Callable[[dict[str, Any]], Awaitable[None] | None]


class EventsError(Exception):
    """The admin listener refused the stream (a wrong token: 401/403) or is not a gateway's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def events(
    admin_url: str,
    token: str | None = None,
    *,
    route: str | None = None,
    errors: bool = False,
    timeout: float = 60.0,
) -> Iterator[dict[str, Any]]:
    """Request events from the gateway whose admin listener is ``admin_url``, until the gateway
    stops or the caller stops iterating. ``route`` keeps one route's; ``errors`` only failed
    requests. The gateway sends a comment at least every 15 s, so ``timeout`` only trips on a
    connection that went silent."""
    parts = urlsplit(admin_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"admin_url must be an http(s) URL, not {admin_url!r}")
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = connection_class(parts.hostname, parts.port, timeout=timeout)
    query = {k: v for k, v in {"route": route, "errors": "true" if errors else None}.items() if v}
    path = (parts.path.rstrip("/") or "") + "/api/events" + (f"?{urlencode(query)}" if query else "")
    headers = {"Accept": "text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            raise EventsError(response.status, response.read(2000).decode("utf-8", "replace"))
        yield from _parse(response)
    finally:
        conn.close()


def _parse(response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """Server-sent events (the HTML Living Standard's event stream format): ``data`` lines up to
    a blank line make one event; comments (``:``) keep the connection alive."""
    data: list[bytes] = []
    while True:
        line = response.readline()
        if not line:
            return
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                yield orjson.loads(b"\n".join(data))
                data = []
        elif line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))


async def watch(
    admin_url: str,
    token: str | None = None,
    *,
    on_request: Callback,
    on_error: Callback | None = None,
    route: str | None = None,
) -> None:
    """Call ``on_request`` for every request event (and ``on_error`` as well for a failed one),
    until the gateway stops the stream. Callbacks may be plain functions or coroutines."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()

    def read() -> None:
        try:
            for event in events(admin_url, token, route=route):
                loop.call_soon_threadsafe(queue.put_nowait, event)
        except BaseException as exc:  # handed to the coroutine, which raises it
            loop.call_soon_threadsafe(queue.put_nowait, exc)
            return
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=read, name="apigate-events", daemon=True).start()
    while True:
        item = await queue.get()
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        await _call(on_request, item)
        if on_error is not None and item.get("error"):
            await _call(on_error, item)


async def _call(callback: Callback, event: dict[str, Any]) -> None:
    result = callback(event)
    if inspect.isawaitable(result):
        await result
