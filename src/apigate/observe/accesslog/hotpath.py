"""The access log's per-request work, compiled with the engine (setup.py lists it): the engine
calls ``Lines`` for every finished exchange, which reads the exchange's native attributes into a
row (a tuple of its values) and puts it in a ``RowBuffer`` that hands batches to the pipe, which
sends each as one JSON array (``rows_text``: one orjson call a batch). The writing process
(writer.py) names the fields and formats the time and durations, off the event loop.

Like the policies' hot paths, it takes plain values and callables from ``lines.py`` (the Python
side: settings, redaction rules) and imports only the engine's Exchange, orjson and the
standard library.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

import orjson

from apigate.engine.exchange import Exchange
from apigate.engine.plan import Target

_MOST_ADDRESSES: Final = 4096
# Module statics in compiled code (a global or builtin name is a dict lookup each time it is read);
# a plugin's value of another type is written as its text, not refused.
_DUMPS: Final = orjson.dumps
_AS_TEXT: Final = str


Row = tuple[object, ...]  # an exchange's values, in the order writer.Formatter reads them


class RowBuffer:
    """Rows waiting for the writer: ``put`` appends, and every ``batch`` rows the list goes to
    ``send`` (the writer, on the loop) in one call. The writer takes what is left on its timer."""

    def __init__(self, batch: int, send: Callable[[list[Row]], None]) -> None:
        self.batch = batch
        self.send = send
        self.rows: list[Row] = []

    def put(self, row: Row) -> None:
        rows = self.rows
        rows.append(row)
        if len(rows) >= self.batch:
            self.rows = []
            self.send(rows)

    def take(self) -> list[Row]:
        rows = self.rows
        self.rows = []
        return rows


def rows_text(rows: list[Row]) -> bytes:
    """A batch of rows as one line for the writing process: the number of rows, a space, and the
    rows as a JSON array of arrays. One orjson call and one allocation for the batch: a row
    written alone costs ~700 instructions more, and cutting the array into a line per row as much."""
    try:
        text = _DUMPS(rows, default=_AS_TEXT)
    except orjson.JSONEncodeError:  # a lone surrogate (from a JWT claim): escaped, not refused
        text = json.dumps(rows, default=str, separators=(",", ":")).encode()
    return b"".join([str(len(rows)).encode(), b" ", text, b"\n"])


class Lines:
    """``__call__`` is the finish hook; successes are written at the ``sample`` ratio."""

    def __init__(
        self,
        buffer: RowBuffer,
        sample: float,
        chance: Callable[[], float],
        keep_query: bool,
        redact_query: Callable[[bytes], str],
        redact_path: Callable[[str], str],
        subject: Callable[[Any], str | None],
        headers: Callable[[list[tuple[bytes, bytes]]], dict[str, str | None]] | None,
    ) -> None:
        """``headers``: the listed request headers of an exchange, redacted (None: none listed)."""
        self.buffer = buffer
        self.sample = sample
        self.chance = chance
        self.keep_query = keep_query
        self.redact_query = redact_query
        self.redact_path = redact_path
        self.subject = subject
        self.headers = headers
        self.addresses: dict[str, str] = {}  # "host:port" by target id

    def address(self, target: Target) -> str:
        """The target's ``host:port``, made once."""
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
        self.buffer.put(self.row(exchange))  # (a native call: the buffer is compiled too)

    def row(self, exchange: Exchange) -> Row:
        """The exchange's row, in the order writer.Formatter reads it. Credentials are redacted
        here: nothing secret leaves the worker."""
        path = exchange.path
        if "eyJ" in path:  # a token in the path (a magic link): one substring test per request
            path = self.redact_path(path)
        query = exchange.query
        if query and self.keep_query:
            path = path + "?" + self.redact_query(query)
        start = exchange.t_start
        duration = (exchange.t_end or start) - start
        first_byte = exchange.t_first_byte
        attempt_began = exchange.t_attempt
        waited = None
        if first_byte and attempt_began and first_byte >= attempt_began:
            waited = int((first_byte - attempt_began) * 1_000_000.0)
        rid = exchange.rid
        trace_id = exchange.trace_id
        route = exchange.route
        target = exchange.target
        key_id = user_id = limited = cache = None
        state = exchange.state
        if state:
            key_id = state.get("key_id")
            claims = state.get("claims")
            if claims is not None:
                user_id = self.subject(claims)
            limited = state.get("limited")
            cache = state.get("cache")  # hit, stale, miss, revalidated, bypass, refresh (docs/cache.md)
        headers = self.headers
        return (
            start,
            rid.decode("latin-1"),
            # (the same id unless the client sent its own request id or trace)
            None if trace_id is rid else trace_id.decode("latin-1"),
            exchange.client_ip,
            exchange.method,
            path,
            exchange.response_status,
            int(duration * 1_000_000.0) if duration > 0.0 else 0,
            exchange.bytes_in,
            exchange.bytes_out,
            exchange.attempt,
            route.name if route is not None else None,
            self.address(target) if target is not None else None,
            waited,
            exchange.consumer_id(),
            exchange.tenant,
            key_id,
            user_id,
            limited,
            cache,
            exchange.tried,
            exchange.failure,
            headers(exchange.headers) if headers is not None else None,
        )
