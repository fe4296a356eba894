"""The access log's per-request work, compiled with the engine (setup.py lists it): the engine
calls ``Lines`` for every finished exchange, which reads the exchange's native attributes, builds
the line's dict and hands ``orjson.dumps`` of it to the writer's queue. Interpreted, this was
about 2.4 µs a line; compiled, attribute reads are struct reads and the dict is built in C.

Like the policies' hot paths, it takes plain values and callables from ``lines.py`` (the Python
side: settings, redaction rules) and imports only the engine's Exchange and the standard library.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

import orjson

from apigate.engine.exchange import Exchange

_LINE: Final = orjson.OPT_APPEND_NEWLINE


class Clock:
    """RFC 3339 UTC times with milliseconds: the seconds are formatted once per second, the whole
    text once per millisecond (lines of the same millisecond share it)."""

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""
        self.milli = -1
        self.text = ""

    def format(self, wall: float) -> str:
        milli = int(wall * 1000.0)
        if milli != self.milli:
            second = milli // 1000
            if second != self.second:
                self.second = second
                self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self.milli = milli
            self.text = f"{self.prefix}.{milli % 1000:03d}Z"
        return self.text


class Lines:
    """``__call__`` is the finish hook; successes are written at the ``sample`` ratio."""

    def __init__(
        self,
        put: Callable[[bytes], None],
        sample: float,
        chance: Callable[[], float],
        fields: tuple[str, ...] | None,
        keep_query: bool,
        redact_query: Callable[[bytes], str],
        redact_path: Callable[[str], str],
        subject: Callable[[Any], str | None],
        headers: Callable[[list[tuple[bytes, bytes]]], dict[str, str | None]] | None,
    ) -> None:
        """``fields``: the chosen fields in order (None: all); ``headers``: the listed request
        headers of an exchange, redacted (None: none listed)."""
        self.put = put
        self.sample = sample
        self.chance = chance
        self.fields = fields
        self.keep_query = keep_query
        self.redact_query = redact_query
        self.redact_path = redact_path
        self.subject = subject
        self.headers = headers
        self.clock = Clock()

    def __call__(self, exchange: Exchange) -> None:
        if self.sample < 1.0:
            status = exchange.response_status
            if 0 < status < 400 and exchange.failure is None and self.chance() >= self.sample:
                return
        # (``default=str``: a plugin's value of another type is written as text, not an error.)
        self.put(orjson.dumps(self.record(exchange), default=str, option=_LINE))

    def record(self, exchange: Exchange) -> dict[str, Any]:
        """The line's fields, in their order."""
        start = exchange.t_start
        end = exchange.t_end or start
        first_byte = exchange.t_first_byte
        attempt_began = exchange.t_attempt
        state = exchange.state
        target = exchange.target
        route = exchange.route
        path = exchange.path
        if "eyJ" in path:  # a token in the path (a magic link): one substring test per request
            path = self.redact_path(path)
        query = exchange.query
        if query and self.keep_query:
            path = path + "?" + self.redact_query(query)
        upstream_ms: float | None = None
        if first_byte and attempt_began and first_byte >= attempt_began:
            upstream_ms = int((first_byte - attempt_began) * 1_000_000.0) / 1000
        key_id: Any = None
        user_id: str | None = None
        limited: Any = None
        cache: Any = None
        if state:
            key_id = state.get("key_id")
            claims = state.get("claims")
            if claims is not None:
                user_id = self.subject(claims)
            limited = state.get("limited")
            cache = state.get("cache")
        record: dict[str, Any] = {
            "time": self.clock.format(time.time() - (end - start)),  # when the request came
            "request_id": exchange.request_id,
            "trace_id": exchange.trace_id.decode(),
            "client_ip": exchange.client_ip,
            "method": exchange.method,
            "path": path,
            "route": route.name if route is not None else None,
            "status": exchange.response_status,
            "duration_ms": int((end - start) * 1_000_000.0) / 1000,  # (cheaper than round)
            "upstream_ms": upstream_ms,
            "bytes_in": exchange.bytes_in,
            "bytes_out": exchange.bytes_out,
            "consumer": exchange.consumer_id(),
            "tenant": exchange.tenant,
            "key_id": key_id,
            "user_id": user_id,
            "limited": limited,
            "cache": cache,  # hit, miss or bypass where the cache policy runs
            "attempts": exchange.attempt,
            "tried": exchange.tried,
            "upstream": f"{target.host}:{target.port}" if target is not None else None,
            "error": exchange.failure,
        }
        fields = self.fields
        if fields is not None:
            record = {name: record[name] for name in fields}
        headers = self.headers
        if headers is not None:
            record["headers"] = headers(exchange.headers)
        return record
