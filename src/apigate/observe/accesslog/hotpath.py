"""The access log's per-request work, compiled with the engine (setup.py lists it): the engine
calls ``Lines`` for every finished exchange, which reads the exchange's native attributes into
the line's JSON text and puts it in a ``LineBuffer`` that hands batches to the writer. Fields
without a value are left out by default (a typical line has eight such).

Like the policies' hot paths, it takes plain values and callables from ``lines.py`` (the Python
side: settings, redaction rules) and imports only the engine's Exchange and the standard library.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Final

import orjson

from apigate.engine.exchange import Exchange
from apigate.engine.plan import CompiledRoute, Target

_LINE: Final = orjson.OPT_APPEND_NEWLINE
_MOST_PIECES: Final = 4096


class Clock:
    """RFC 3339 UTC times with milliseconds: the seconds are formatted once per second, the whole
    text once per millisecond (lines of the same millisecond share it). The text starts and ends
    with ``lead`` and ``trail`` (the line's text around the time: two parts fewer in its build)."""

    def __init__(self, lead: str = "", trail: str = "") -> None:
        self.lead = lead
        self.trail = trail
        self.second = -1
        self.prefix = ""
        self.milli = -1
        self.text = ""
        self.offset = 0.0  # wall-clock time minus monotonic time
        self.offset_until = -1.0

    def at(self, monotonic: float) -> str:
        """The wall-clock time of a monotonic time of this process. The offset between the two
        clocks is read once a second, not per line (two clock calls cost ~450 instructions)."""
        if monotonic >= self.offset_until or monotonic < self.offset_until - 2.0:
            self.offset = time.time() - time.monotonic()
            self.offset_until = monotonic + 1.0
        return self.format(monotonic + self.offset)

    def format(self, wall: float) -> str:
        milli = int(wall * 1000.0)
        if milli != self.milli:
            second = milli // 1000
            if second != self.second:
                self.second = second
                self.prefix = self.lead + time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
            self.milli = milli
            self.text = f"{self.prefix}{_THOUSANDTHS[milli % 1000]}Z{self.trail}"
        return self.text


class Piece:
    """``,"name":value`` for the values of a field that recur (a route, a method, a client's
    address, a consumer), made once each: a dict lookup of a string, whose hash the string keeps,
    costs less than escaping it again."""

    def __init__(self, name: str, keep_nulls: bool, lead: str = "", trail: str = "") -> None:
        """``lead`` and ``trail``: the line's text before and after the field, made part of each
        piece (each part of the line's string build costs ~80 instructions)."""
        self.lead = lead + ',"' + name + '":'
        self.trail = trail
        self.null = self.lead + "null" + trail if keep_nulls else lead + trail  # the piece of no value
        self.made: dict[str, str] = {}
        # The last value and its piece: runs of one route, method or connection's address are
        # told by identity, without the lookup (a route's name is one string object).
        self.last: str | None = None
        self.last_piece = ""

    def of(self, value: str) -> str:
        if value is self.last:
            return self.last_piece
        found = self.made.get(value)
        if found is None:
            if len(self.made) >= _MOST_PIECES:  # bounded, whatever the clients send
                self.made.clear()
            found = self.made[value] = self.lead + _json(value) + self.trail
        self.last = value
        self.last_piece = found
        return found


class LineBuffer:
    """Lines waiting for the writer: ``put`` appends, and every ``batch`` lines the list goes to
    ``send`` (the writer, on the loop) in one call; ``send`` must not keep it, as it is emptied and
    filled again (a list made per batch is one more object for the collector to walk while it
    is young). The writer takes what is left on its timer. Lines are text, encoded a batch at a
    time (an encode per line costs ~250 instructions)."""

    def __init__(self, batch: int, send: Callable[[list[str]], None]) -> None:
        self.batch = batch
        self.send = send
        self.lines: list[str] = []

    def put(self, line: str) -> None:
        lines = self.lines
        lines.append(line)
        if len(lines) >= self.batch:
            try:
                self.send(lines)
            finally:  # (sent or failed, the lines are not sent twice)
                lines.clear()

    def take(self) -> list[str]:
        lines = self.lines[:]
        self.lines.clear()
        return lines


class Lines:
    """``__call__`` is the finish hook; successes are written at the ``sample`` ratio."""

    def __init__(
        self,
        buffer: LineBuffer,
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
        self.buffer = buffer
        self.sample = sample
        self.chance = chance
        self.fields = fields
        self.keep_query = keep_query
        self.redact_query = redact_query
        self.redact_path = redact_path
        self.subject = subject
        self.headers = headers
        self.keep_nulls = keep_nulls
        self.clock = Clock(lead='{"time":"', trail='","request_id":"')
        self.addresses: dict[str, str] = {}  # the upstream's piece by target id
        # The last route and target and their pieces together: a route's requests go to a few
        # targets, so runs of one pair are told by identity (no lookup and one part fewer).
        self.last_route: CompiledRoute | None = None
        self.last_target: Target | None = None
        self.last_destination = ""
        self.upstream_null = ',"upstream":null' if keep_nulls else ""
        self.upstream_ms_null = ',"upstream_ms":null' if keep_nulls else ""
        self.client_ip = Piece("client_ip", keep_nulls, lead='"')  # (closing the trace id)
        self.method = Piece("method", keep_nulls, trail=',"path":"')
        self.route = Piece("route", keep_nulls)
        self.consumer = Piece("consumer", keep_nulls)
        self.tenant = Piece("tenant", keep_nulls)
        self.key_id = Piece("key_id", keep_nulls)
        self.user_id = Piece("user_id", keep_nulls)
        self.limited = Piece("limited", keep_nulls)
        self.cache = Piece("cache", keep_nulls)

    def address(self, target: Target) -> str:
        """``,"upstream":"host:port"`` for the target, made once."""
        found = self.addresses.get(target.id)
        if found is None:
            if len(self.addresses) >= _MOST_PIECES:  # (targets come and go with discovery)
                self.addresses.clear()
            found = self.addresses[target.id] = ',"upstream":' + _json(f"{target.host}:{target.port}")
        return found

    def __call__(self, exchange: Exchange) -> None:
        if self.sample < 1.0:
            status = exchange.response_status
            if 0 < status < 400 and exchange.failure is None and self.chance() >= self.sample:
                return
        self.buffer.put(self.line(exchange))  # (a native call: the buffer is compiled too)

    def line(self, exchange: Exchange) -> str:
        """The exchange's line: a JSON object of the chosen fields, in their order, and a newline."""
        headers = self.headers
        if headers is None:
            text = self.text(exchange, "}\n")
        else:
            text = self.text(exchange, f',"headers":{_json(headers(exchange.headers))}}}\n')
        fields = self.fields
        if fields is None:
            return text
        # Chosen fields: the whole line is read back and the chosen ones written in their order
        # (a choice of fields is rarer than the default and may cost more; one way of making lines).
        record = orjson.loads(text)
        chosen = {name: record[name] for name in fields if name in record}
        if headers is not None:
            chosen["headers"] = record["headers"]
        return orjson.dumps(chosen, option=_LINE).decode()

    def text(self, exchange: Exchange, tail: str) -> str:
        """The line's fields in the order of FIELDS (config/accesslog.py) as JSON text, then
        ``tail``; fields without a value are left out unless ``keep_nulls``.

        Made as text in one f-string (one allocation), not as a dict for orjson: the dict of ~15
        fields and its serialisation cost ~7,000 instructions a request (bench/cost). Every string
        that does not come from the gateway itself is escaped by orjson (``_json``), directly or
        through a ``Piece``."""
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
        micros = int(duration * 1_000_000.0) if duration > 0.0 else 0
        # Ids are hex or a client's printable ASCII without quote or backslash (engine/exchange.py):
        # written between quotes as they are.
        rid = exchange.rid
        request_id = rid.decode("latin-1")
        trace_id = exchange.trace_id
        # (the same id unless the client sent its own request id or trace)
        trace = request_id if trace_id is rid else trace_id.decode("latin-1")
        if route is self.last_route and target is self.last_target and route is not None:
            destination = self.last_destination
        else:
            destination = self.destination(route, target)
        if first_byte and attempt_began and first_byte >= attempt_began:
            waited = int((first_byte - attempt_began) * 1_000_000.0)
            waited_whole = _upstream_millis(waited // 1000)
            waited_part = _THOUSANDTHS[waited % 1000]
        else:
            waited_whole = self.upstream_ms_null
            waited_part = ""
        identity = self.optional(self.consumer, exchange.consumer_id()) + self.optional(
            self.tenant, exchange.tenant
        )
        if state:
            claims = state.get("claims")
            # (one string build: each + would make a string of its own)
            identity = (
                f"{identity}{self.optional(self.key_id, state.get('key_id'))}"
                f"{self.optional(self.user_id, self.subject(claims) if claims is not None else None)}"
                f"{self.optional(self.limited, state.get('limited'))}"
                # hit, stale, miss, revalidated, bypass, refresh (docs/cache.md)
                f"{self.optional(self.cache, state.get('cache'))}"
            )
        elif keep_nulls:
            identity += ',"key_id":null,"user_id":null,"limited":null,"cache":null'
        tried = exchange.tried
        failure = exchange.failure
        if tried is not None or failure is not None or keep_nulls:
            identity += self.rare("tried", tried) + self.rare("error", failure)
        # (the pieces and tables below carry the names and punctuation around the values)
        return (
            f'{self.clock.at(start)}{request_id}","trace_id":"{trace}'  # (the time: when it came)
            f"{self.client_ip.of(exchange.client_ip)}{self.method.of(exchange.method)}"
            f"{_inside_quotes(path)}{_status_piece(exchange.response_status)}"
            f"{_whole_millis(micros // 1000)}{_duration_end(micros % 1000)}{_number(exchange.bytes_in)}"
            f"{_bytes_out(exchange.bytes_out)}{_attempts(exchange.attempt)}{destination}"
            f"{waited_whole}{waited_part}{identity}{tail}"
        )

    def destination(self, route: CompiledRoute | None, target: Target | None) -> str:
        """The route's and the upstream's fields, remembered as the last pair."""
        route_piece = self.route.of(route.name) if route is not None else self.route.null
        upstream = self.address(target) if target is not None else self.upstream_null
        self.last_route = route
        self.last_target = target
        self.last_destination = route_piece + upstream
        return self.last_destination

    def optional(self, piece: Piece, value: object) -> str:
        """The field's piece, or nothing (``null`` with ``keep_nulls``) when it has no value."""
        if value is None:
            return piece.null
        if isinstance(value, str):
            return piece.of(value)
        return piece.lead + _json(value) + piece.trail  # a plugin's value of another type

    def rare(self, name: str, value: object) -> str:
        """A field seldom written (the attempts of a retried request, an error), escaped each time."""
        if value is None:
            return f',"{name}":null' if self.keep_nulls else ""
        return f',"{name}":{_json(value)}'


# "000" to "999": the milliseconds' decimals; and the numbers below 1000 (statuses, attempts,
# most durations): looked up instead of formatted.
_THOUSANDTHS: Final = tuple(f"{n:03d}" for n in range(1000))
_SMALL_NUMBERS: Final = tuple(str(n) for n in range(1000))


def _number(n: int) -> str:
    return _SMALL_NUMBERS[n] if 0 <= n < 1000 else str(n)


# What follows the path up to the duration, by status; whole milliseconds with their dot; the
# duration's decimals with the next field's name; bytes out and attempts with their names; the
# upstream's whole milliseconds with the field's name. Each string put together once saves the
# line's build a part or two (~80 instructions each).
_STATUS_PIECES: Final = tuple(f'","status":{n},"duration_ms":' for n in range(1000))
_WHOLE_MILLIS: Final = tuple(f"{n}." for n in range(1000))
_DURATION_ENDS: Final = tuple(f'{n:03d},"bytes_in":' for n in range(1000))
_BYTES_OUT: Final = tuple(f',"bytes_out":{n}' for n in range(1000))
_ATTEMPTS: Final = tuple(f',"attempts":{n}' for n in range(1000))
_UPSTREAM_MILLIS: Final = tuple(f',"upstream_ms":{n}.' for n in range(1000))


def _duration_end(thousandths: int) -> str:
    return _DURATION_ENDS[thousandths]


def _bytes_out(n: int) -> str:
    return _BYTES_OUT[n] if 0 <= n < 1000 else f',"bytes_out":{n}'


def _attempts(n: int) -> str:
    return _ATTEMPTS[n] if 0 <= n < 1000 else f',"attempts":{n}'


def _upstream_millis(millis: int) -> str:
    return _UPSTREAM_MILLIS[millis] if 0 <= millis < 1000 else f',"upstream_ms":{millis}.'


def _status_piece(status: int) -> str:
    if 0 <= status < 1000:
        return _STATUS_PIECES[status]
    return f'","status":{status},"duration_ms":'


def _whole_millis(millis: int) -> str:
    return _WHOLE_MILLIS[millis] if 0 <= millis < 1000 else f"{millis}."


def _inside_quotes(text: str) -> str:
    """A string as it goes between the quotes of a JSON string: kept as it is when it holds no
    quote, backslash, control character (RFC 8259 §7) or lone surrogate (no UTF-8 for it), which a
    compiled loop checks for a few instructions a character; anything else is escaped by orjson."""
    for index in range(len(text)):
        code = ord(text[index])
        if code < 0x20 or code == 0x22 or code == 0x5C or 0xD800 <= code <= 0xDFFF:
            return _json(text)[1:-1]
    return text


def _json(value: object) -> str:
    """Any value as JSON text (a plugin's value of another type as its text, not an error)."""
    try:
        return orjson.dumps(value, default=str).decode()
    except orjson.JSONEncodeError:  # a lone surrogate (from a JWT claim): escaped, not refused
        return json.dumps(value, default=str)
