"""The access log's per-request work, compiled with the engine (setup.py lists it): the engine
calls ``Lines`` for every finished exchange, which reads the exchange's native attributes into a
record (a tuple) and puts it in a ``LineBuffer``; a full buffer's records are made into JSON lines
in one call (render.py, compiled to C) and handed to the writer as bytes.

Like the policies' hot paths, it takes plain values and callables from ``lines.py`` (the Python
side: settings, redaction rules) and imports only the engine's Exchange and Target, render.py
and the standard library.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Final

import orjson

from apigate.engine.exchange import Exchange
from apigate.engine.plan import Target
from apigate.observe.accesslog.render import render

_MOST_ADDRESSES: Final = 4096
UNPRINTABLE: Final = b'"[unprintable]"'  # a value that has no JSON text


class LineBuffer:
    """Records waiting for the writer: ``put`` appends, and every ``batch`` records their lines go
    to ``send`` (the writer, on the loop) as one bytes object with their count. The writer takes
    what is left on its timer."""

    def __init__(self, batch: int, send: Callable[[bytes, int], None]) -> None:
        self.batch = batch
        self.send = send
        self.records: list[tuple[Any, ...]] = []

    def put(self, record: tuple[Any, ...]) -> None:
        records = self.records
        records.append(record)
        if len(records) >= self.batch:
            try:
                self.send(lines_of(records), len(records))
            finally:  # (sent or failed, the records are not sent twice)
                records.clear()

    def take(self) -> tuple[bytes, int]:
        """The lines of the records waiting, and their count; the buffer is left empty."""
        records = self.records
        if not records:
            return b"", 0
        try:
            return lines_of(records), len(records)
        finally:
            records.clear()

    def __len__(self) -> int:
        return len(self.records)


def lines_of(records: list[tuple[Any, ...]]) -> bytes:
    """The JSON lines of ``records``: their start times are monotonic, read now as wall-clock."""
    return render(records, time.time() - time.monotonic(), json_text)


class Lines:
    """``__call__`` is the finish hook; successes are written at the ``sample`` ratio."""

    def __init__(
        self,
        buffer: LineBuffer,
        sample: float,
        chance: Callable[[], float],
        choose: Callable[[bytes], bytes] | None,
        keep_query: bool,
        redact_query: Callable[[bytes], str],
        redact_path: Callable[[str], str],
        subject: Callable[[Any], str | None],
        headers: Callable[[list[tuple[bytes, bytes]]], dict[str, str | None]] | None,
        keep_nulls: bool,
    ) -> None:
        """``choose``: the line of the chosen fields made from the whole one (None: all fields);
        ``headers``: the listed request headers of an exchange, redacted (None: none listed);
        ``keep_nulls``: fields without a value are written as null (else left out)."""
        self.buffer = buffer
        self.sample = sample
        self.chance = chance
        self.choose = choose
        self.keep_query = keep_query
        self.redact_query = redact_query
        self.redact_path = redact_path
        self.subject = subject
        self.headers = headers
        self.keep_nulls = keep_nulls
        # "host:port" of the last target and of each target by id, made once (a route's requests
        # go to a few targets: runs of one are told by identity).
        self.last_target: Target | None = None
        self.last_address = ""
        self.addresses: dict[str, str] = {}

    def __call__(self, exchange: Exchange) -> None:
        if self.sample < 1.0:
            status = exchange.response_status
            if 0 < status < 400 and exchange.failure is None and self.chance() >= self.sample:
                return
        self.buffer.put(self.record(exchange))  # (a native call: the buffer is compiled too)

    def record(self, exchange: Exchange) -> tuple[Any, ...]:
        """The exchange's values as render.py's record: read here, written as JSON a batch at a
        time. Paths, queries and headers are redacted here (lines.py has the rules)."""
        start = exchange.t_start
        end = exchange.t_end or start
        duration = end - start
        first_byte = exchange.t_first_byte
        attempt_began = exchange.t_attempt
        upstream_us: int | None = None
        if first_byte and attempt_began and first_byte >= attempt_began:
            upstream_us = int((first_byte - attempt_began) * 1_000_000.0)
        path = exchange.path
        if "eyJ" in path:  # a token in the path (a magic link): one substring test per request
            path = self.redact_path(path)
        query = exchange.query
        if query and self.keep_query:
            path = path + "?" + self.redact_query(query)
        route = exchange.route
        target = exchange.target
        state = exchange.state
        key_id: object = None
        user_id: str | None = None
        limited: object = None
        cache: object = None
        if state:
            key_id = state.get("key_id")
            claims = state.get("claims")
            if claims is not None:
                user_id = self.subject(claims)
            limited = state.get("limited")
            cache = state.get("cache")  # hit, stale, miss, revalidated, bypass, refresh (docs/cache.md)
        headers = self.headers
        return (
            self.keep_nulls,
            self.choose,
            start,
            int(duration * 1_000_000.0) if duration > 0.0 else 0,
            exchange.rid,
            exchange.trace_id,
            exchange.client_ip,
            exchange.method,
            path,
            exchange.response_status,
            exchange.bytes_in,
            exchange.bytes_out,
            exchange.attempt,
            route.name if route is not None else None,
            self.address(target) if target is not None else None,
            upstream_us,
            exchange.consumer_id(),
            exchange.tenant,
            key_id,
            user_id,
            limited,
            cache,
            exchange.tried,
            exchange.failure,
            json_text(headers(exchange.headers)) if headers is not None else None,
        )

    def address(self, target: Target) -> str:
        if target is self.last_target:
            return self.last_address
        address = self.addresses.get(target.id)
        if address is None:
            if len(self.addresses) >= _MOST_ADDRESSES:  # (targets come and go with discovery)
                self.addresses.clear()
            address = self.addresses[target.id] = f"{target.host}:{target.port}"
        self.last_target = target
        self.last_address = address
        return address


def json_text(value: object) -> bytes:
    """Any value as JSON text (a plugin's value of another type as its text, not an error). It
    never raises: the lines of a batch are made together, and one value must not lose them all."""
    try:
        return orjson.dumps(value, default=str)
    except orjson.JSONEncodeError:  # a lone surrogate (from a JWT claim): escaped, not refused
        try:
            return json.dumps(value, default=str).encode()
        except Exception:  # a plugin's value whose str() fails, or nested past the recursion limit
            return UNPRINTABLE
