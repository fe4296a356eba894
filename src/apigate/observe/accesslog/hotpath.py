"""The access log's per-request work, compiled with the engine (setup.py lists it): the engine
calls ``Records`` for every finished exchange, which reads the exchange's native attributes into
a tuple of raw values and puts it in a ``RecordBuffer`` that hands batches to the pipe. The JSON
line is made from the tuple by the writing process (writer.py), off the event loop: filling a
dict and ``orjson.dumps`` cost the loop about three times what the tuple and its share of the
batch's ``marshal`` do (bench/cost).

Like the policies' hot paths, it takes plain values and callables from ``lines.py`` (the Python
side: settings, redaction rules) and imports only the engine's Exchange and the standard library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from apigate.engine.exchange import Exchange
from apigate.engine.plan import Target

_MOST_ADDRESSES: Final = 1024

# A record: the values of config/accesslog.py's FIELDS in their order, raw (writer.py's
# ``Formatter`` turns them into the line's), then the listed request headers (or None):
#   time: the monotonic clock at the request's start, request_id: bytes, trace_id: bytes or None
#   (the request id's), duration_ms and upstream_ms: seconds (float) or None.
Record = tuple[Any, ...]


class RecordBuffer:
    """Records waiting for the pipe: ``put`` appends, and every ``batch`` records the list goes
    to ``send`` (on the loop) in one call. The pipe takes what is left on its timer."""

    def __init__(self, batch: int, send: Callable[[list[Record]], None]) -> None:
        self.batch = batch
        self.send = send
        self.records: list[Record] = []

    def put(self, record: Record) -> None:
        records = self.records
        records.append(record)
        if len(records) >= self.batch:
            self.records = []
            self.send(records)

    def take(self) -> list[Record]:
        records = self.records
        self.records = []
        return records


class Records:
    """``__call__`` is the finish hook; successes are written at the ``sample`` ratio."""

    def __init__(
        self,
        put: Callable[[Record], None],
        sample: float,
        chance: Callable[[], float],
        keep_query: bool,
        redact_query: Callable[[bytes], str],
        redact_path: Callable[[str], str],
        subject: Callable[[Any], str | None],
        headers: Callable[[list[tuple[bytes, bytes]]], dict[str, str | None]] | None,
    ) -> None:
        """``headers``: the listed request headers of an exchange, redacted (None: none listed)."""
        self.put = put
        self.sample = sample
        self.chance = chance
        self.keep_query = keep_query
        self.redact_query = redact_query
        self.redact_path = redact_path
        self.subject = subject
        self.headers = headers
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
        self.put(self.record(exchange))

    def record(self, exchange: Exchange) -> Record:
        """The exchange's raw values, in the order of FIELDS, then the listed headers."""
        start = exchange.t_start
        end = exchange.t_end or start
        first_byte = exchange.t_first_byte
        attempt_began = exchange.t_attempt
        path = exchange.path
        if "eyJ" in path:  # a token in the path (a magic link): one substring test per request
            path = self.redact_path(path)
        query = exchange.query
        if query and self.keep_query:
            path = path + "?" + self.redact_query(query)
        upstream: float | None = None
        if first_byte and attempt_began and first_byte >= attempt_began:
            upstream = first_byte - attempt_began
        rid = exchange.rid
        trace_id = exchange.trace_id
        route = exchange.route
        target = exchange.target
        state = exchange.state
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
            cache = state.get("cache")  # hit, stale, miss, revalidated, bypass, refresh (docs/cache.md)
        headers = self.headers
        return (
            start,
            rid,
            None if trace_id is rid else trace_id,  # (the same id unless the client sent its own)
            exchange.client_ip,
            exchange.method,
            path,
            exchange.response_status,
            end - start,
            exchange.bytes_in,
            exchange.bytes_out,
            exchange.attempt,
            route.name if route is not None else None,
            self.address(target) if target is not None else None,
            upstream,
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
