"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the ids a request carries onward.

Every proxied request goes upstream with a ``traceparent`` naming the gateway's span as its
parent: the client's trace when it sent a valid ``traceparent`` (its sampled flag kept), a new
trace otherwise. ``tracestate`` travels untouched with the other headers. The response carries
``traceresponse`` (Trace Context Level 2) with the trace id and the gateway's span id, so a
client that sent nothing learns the trace id of its request.

Ids are made without a random draw per request: a random per-process prefix and a counter,
as request ids are (engine/wire.py). A new trace reuses the request id the gateway made, which
is 32 hex digits as a trace id is: logs then name one id for both. New traces are sampled at
the configured ratio by an accumulator, which samples exactly that share and needs no draw.
"""

from __future__ import annotations

import os
import re
from typing import Final

from apigate.engine.wire import HexCounter

_TRACEPARENT: Final = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE: Final = b"0" * 32
_ZERO_SPAN: Final = b"0" * 16


class TraceIds:
    """Span ids and sampling decisions for one process."""

    def __init__(self) -> None:
        self.spans = HexCounter(b"", 15, int.from_bytes(os.urandom(8), "big"))
        self.ratio = 0.0
        self.credit = 0.0

    def span_id(self) -> bytes:
        """A new span id: 15 hex digits of the process's base mixed with a counter, then ``1``."""
        return self.span_base() + b"1"

    def span_base(self) -> bytes:
        """15 hex digits unique in this process: a request's span ids are these and one more
        digit each, so one number is formatted per request, not one per span."""
        return self.spans.next()

    def sample(self) -> bool:
        """Whether a new trace is sampled: exactly ``ratio`` of them, evenly spread."""
        self.credit += self.ratio
        if self.credit >= 1.0:
            self.credit -= 1.0
            return True
        return False


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, bool] | None:
    """(trace id, parent span id, sampled) of a valid ``traceparent``; None for an invalid one,
    which starts a new trace (W3C Trace Context §4.3)."""
    found = _TRACEPARENT.fullmatch(value)
    if found is None:
        return None
    version, trace_id, parent_id, flags, rest = found.groups()
    if version == b"ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    if version == b"00" and rest is not None:  # version 00 has exactly four fields
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)
