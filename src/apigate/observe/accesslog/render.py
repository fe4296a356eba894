# cython: annotation_typing=False
"""A batch of access-log records as the bytes of their JSON lines, in one call.

The finish hook (hotpath.py) keeps each exchange's values as a tuple (``Record`` below) and the
lines are made here, a batch at a time, when the batch goes to the writer. Made one at a time as
Python strings, a line cost ~5,000 instructions on the loop (bench/cost): ~20 parts put together,
a string, a clock read; when this module is compiled (Cython, see setup.py), a batch is one
loop in C (render.pxd) writing into one bytes object, with the same bytes as the Python below,
which is the reference the tests compare the C with (tests/test_access_log_render.py).

Every value that is not the gateway's own text is escaped: a string of printable ASCII without
quote or backslash is copied as it is, anything else is written by ``json_text`` (orjson).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, Final

try:
    import cython

    COMPILED: bool = cython.compiled
except ImportError:  # Cython builds this module; running it as Python does not need it
    COMPILED = False

JsonText = Callable[[Any], bytes]

# The fields of a record, in order (hotpath.py's Lines.record makes them):
#   keep_nulls, choose, start, duration_us, request_id, trace_id, client_ip, method, path,
#   status, bytes_in, bytes_out, attempts, route, upstream, upstream_us,
#   consumer, tenant, key_id, user_id, limited, cache, tried, error, headers
# ``keep_nulls`` is True or False; ``start`` a time.monotonic() reading; ``choose`` (None: every
# field) makes the line of chosen fields from the whole one; ``upstream`` is "host:port";
# ``headers`` is JSON text already (None: none listed).
RECORD_SIZE: Final = 25

# Between JSON quotes as they are (RFC 8259 §7): no control character, quote or backslash.
_ESCAPED: Final = re.compile(r'[\x00-\x1f"\\]')
_ESCAPED_BYTES: Final = re.compile(rb'[\x00-\x1f"\\\x80-\xff]')
_LONGEST_INT: Final = 1 << 63
# The optional fields after attempts, with their names as they precede the value.
_OPTIONAL: Final = (
    b',"consumer":',
    b',"tenant":',
    b',"key_id":',
    b',"user_id":',
    b',"limited":',
    b',"cache":',
    b',"tried":',
    b',"error":',
)


def render(records: list[tuple[Any, ...]], offset: float, json_text: JsonText) -> bytes:
    """The lines of ``records``, each ending in a newline; ``offset``: wall-clock time minus
    monotonic time (a record's start is monotonic)."""
    if COMPILED:
        return _render_in_c(records, offset, json_text)  # noqa: F821 - defined only when compiled
    return render_in_python(records, offset, json_text)


def render_in_python(records: list[tuple[Any, ...]], offset: float, json_text: JsonText) -> bytes:
    return b"".join([_line(record, offset, json_text) for record in records])


def _line(record: tuple[Any, ...], offset: float, json_text: JsonText) -> bytes:
    if type(record) is not tuple or len(record) != RECORD_SIZE:
        raise TypeError(f"an access-log record is a tuple of {RECORD_SIZE} values")
    (keep_nulls, choose, start, duration_us, request_id, trace_id, client_ip, method, path) = record[:9]
    (status, bytes_in, bytes_out, attempts, route, upstream, upstream_us) = record[9:16]
    keep_nulls = keep_nulls is True
    parts = [
        b'{"time":"',
        _wall_time(start + offset),
        b'","request_id":',
        _id(request_id, json_text),
        b',"trace_id":',
        _id(trace_id, json_text),
        b',"client_ip":',
        _text(client_ip, json_text),
        b',"method":',
        _text(method, json_text),
        b',"path":',
        _text(path, json_text),
        b',"status":',
        _integer(status, json_text),
        b',"duration_ms":',
        _millis(duration_us, json_text),
        b',"bytes_in":',
        _integer(bytes_in, json_text),
        b',"bytes_out":',
        _integer(bytes_out, json_text),
        b',"attempts":',
        _integer(attempts, json_text),
    ]
    if route is not None or keep_nulls:
        parts += (b',"route":', _text(route, json_text))
    if upstream is not None or keep_nulls:
        parts += (b',"upstream":', _text(upstream, json_text))
    if upstream_us is not None:
        parts += (b',"upstream_ms":', _millis(upstream_us, json_text))
    elif keep_nulls:
        parts.append(b',"upstream_ms":null')
    for name, value in zip(_OPTIONAL, record[16:24], strict=True):
        if value is not None or keep_nulls:
            parts += (name, _text(value, json_text))
    headers = record[24]
    if headers is not None:
        parts += (b',"headers":', headers)
    parts.append(b"}\n")
    line = b"".join(parts)
    return line if choose is None else choose(line)


def _wall_time(wall: float) -> bytes:
    """RFC 3339 UTC with milliseconds."""
    milli = int(wall * 1000.0)
    second, thousandths = divmod(milli, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode() + b".%03dZ" % thousandths


def _id(raw: Any, json_text: JsonText) -> bytes:
    """A request or trace id (bytes): quoted as it is when it holds printable ASCII only."""
    if type(raw) is not bytes:
        return json_text(raw)
    if _ESCAPED_BYTES.search(raw):
        return json_text(raw.decode("latin-1"))
    return b'"' + raw + b'"'


def _text(value: Any, json_text: JsonText) -> bytes:
    if value is None:
        return b"null"
    if type(value) is str and value.isascii() and not _ESCAPED.search(value):
        return b'"' + value.encode() + b'"'
    return json_text(value)


def _integer(value: Any, json_text: JsonText) -> bytes:
    if type(value) is int and -_LONGEST_INT <= value < _LONGEST_INT:
        return b"%d" % value
    return json_text(value)


def _millis(micros: Any, json_text: JsonText) -> bytes:
    """Microseconds as milliseconds with three decimals."""
    if type(micros) is int and 0 <= micros < _LONGEST_INT:
        return b"%d.%03d" % divmod(micros, 1000)
    return json_text(micros)
