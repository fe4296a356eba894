"""The access log's per-request work, compiled with the engine (setup.py lists it): the engine
calls ``Lines`` for every finished exchange, which reads the exchange's native attributes into
the line's dict and puts ``orjson.dumps`` of it in a ``LineBuffer`` that hands batches to the
writer. Fields without a value are left out by default: each field costs a dict insertion and
orjson's work, and a typical line has eight such (orjson writes JSON faster than any string
building here could).

Like the policies' hot paths, it takes plain values and callables from ``lines.py`` (the Python
side: settings, redaction rules) and imports only the engine's Exchange and the standard library.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

import orjson

from apigate.engine.exchange import Exchange
from apigate.engine.plan import Target

_LINE: Final = orjson.OPT_APPEND_NEWLINE
_MOST_ADDRESSES: Final = 1024


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


class LineBuffer:
    """Lines waiting for the writer: ``put`` appends, and every ``batch`` lines the list goes to
    ``send`` (the writer, on the loop) in one call. The writer takes what is left on its timer."""

    def __init__(self, batch: int, send: Callable[[list[bytes]], None]) -> None:
        self.batch = batch
        self.send = send
        self.lines: list[bytes] = []

    def put(self, line: bytes) -> None:
        lines = self.lines
        lines.append(line)
        if len(lines) >= self.batch:
            self.lines = []
            self.send(lines)

    def take(self) -> list[bytes]:
        lines = self.lines
        self.lines = []
        return lines


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
        keep_nulls: bool,
    ) -> None:
        """``fields``: the chosen fields in order (None: all); ``headers``: the listed request
        headers of an exchange, redacted (None: none listed); ``keep_nulls``: fields without a
        value are written as null (else left out)."""
        self.put = put
        self.sample = sample
        self.chance = chance
        self.fields = fields
        self.keep_query = keep_query
        self.redact_query = redact_query
        self.redact_path = redact_path
        self.subject = subject
        self.headers = headers
        self.keep_nulls = keep_nulls
        self.clock = Clock()
        self.addresses: dict[str, str] = {}  # "host:port" by target id

    def address(self, target: Target) -> str:
        """The target's "host:port", formatted once."""
        found = self.addresses.get(target.id)
        if found is None:
            if len(self.addresses) >= _MOST_ADDRESSES:  # (targets come and go with discovery)
                self.addresses.clear()
            found = self.addresses[target.id] = f"{target.host}:{target.port}"
        return found

    def __call__(self, exchange: Exchange) -> None:
        if self.sample < 1.0:
            status = exchange.response_status
            if 0 < status < 400 and exchange.failure is None and self.chance() >= self.sample:
                return
        self.put(self.line(exchange))

    def line(self, exchange: Exchange) -> bytes:
        """The exchange's line: a JSON object of the chosen fields, in their order, and a newline."""
        record = self.fill(exchange)
        fields = self.fields
        if fields is not None:
            record = {name: record[name] for name in fields if name in record}
        headers = self.headers
        if headers is not None:
            record["headers"] = headers(exchange.headers)
        # (``default=str``: a plugin's value of another type is written as text, not an error.)
        return orjson.dumps(record, default=str, option=_LINE)

    def fill(self, exchange: Exchange) -> dict[str, Any]:
        """The exchange's fields in the order of FIELDS (config/accesslog.py); those without a
        value are left out unless ``keep_nulls``."""
        start = exchange.t_start
        end = exchange.t_end or start
        first_byte = exchange.t_first_byte
        attempt_began = exchange.t_attempt
        state = exchange.state
        target = exchange.target
        route = exchange.route
        keep_nulls = self.keep_nulls
        path = exchange.path
        if "eyJ" in path:  # a token in the path (a magic link): one substring test per request
            path = self.redact_path(path)
        query = exchange.query
        if query and self.keep_query:
            path = path + "?" + self.redact_query(query)
        duration = end - start
        rid = exchange.rid
        request_id = rid.decode("latin-1")
        trace_id = exchange.trace_id
        record: dict[str, Any] = {
            "time": self.clock.format(time.time() - duration),  # when the request came
            "request_id": request_id,
            # (the same id unless the client sent its own request id or trace)
            "trace_id": request_id if trace_id is rid else trace_id.decode(),
            "client_ip": exchange.client_ip,
            "method": exchange.method,
            "path": path,
            "status": exchange.response_status,
            "duration_ms": int(duration * 1_000_000.0) / 1000,  # (cheaper than round)
            "bytes_in": exchange.bytes_in,
            "bytes_out": exchange.bytes_out,
            "attempts": exchange.attempt,
        }
        if route is not None:
            record["route"] = route.name
        elif keep_nulls:
            record["route"] = None
        if target is not None:
            record["upstream"] = self.address(target)
        elif keep_nulls:
            record["upstream"] = None
        if first_byte and attempt_began and first_byte >= attempt_began:
            record["upstream_ms"] = int((first_byte - attempt_began) * 1_000_000.0) / 1000
        elif keep_nulls:
            record["upstream_ms"] = None
        consumer = exchange.consumer_id()
        if consumer is not None or keep_nulls:
            record["consumer"] = consumer
        tenant = exchange.tenant
        if tenant is not None or keep_nulls:
            record["tenant"] = tenant
        if state:
            key_id = state.get("key_id")
            if key_id is not None or keep_nulls:
                record["key_id"] = key_id
            claims = state.get("claims")
            user_id = self.subject(claims) if claims is not None else None
            if user_id is not None or keep_nulls:
                record["user_id"] = user_id
            limited = state.get("limited")
            if limited is not None or keep_nulls:
                record["limited"] = limited
            cache = state.get("cache")  # hit, stale, miss, revalidated, bypass, refresh (docs/cache.md)
            if cache is not None or keep_nulls:
                record["cache"] = cache
        elif keep_nulls:
            record["key_id"] = record["user_id"] = record["limited"] = record["cache"] = None
        tried = exchange.tried
        if tried is not None or keep_nulls:
            record["tried"] = tried
        failure = exchange.failure
        if failure is not None or keep_nulls:
            record["error"] = failure
        return record
