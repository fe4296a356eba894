"""Trace context of webhook deliveries (W3C Trace Context), while span export is on.

Intake keeps the sender's headers, its ``traceparent`` among them. Each delivery attempt is a
span of its own: in the sender's trace, as a child of the sender's span and with its sampled
flag, or, when the sender sent no valid traceparent, in a new trace sampled at
``tracing.sample_ratio``. The destination gets a traceparent naming the attempt's span in place
of the sender's. While export is off, the kept headers go as they came.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from apigate.engine.tracing import TraceIds, parse_traceparent

if TYPE_CHECKING:
    from apigate.store.roles.webhooks import DeliveryClaim
    from apigate.webhooks.destinations.base import Result


@dataclass(frozen=True, slots=True)
class AttemptTrace:
    """The ids of one delivery attempt's span (hex digits, as they travel)."""

    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes | None  # the sender's span; None in a new trace
    sampled: bool

    def traceparent(self) -> bytes:
        return b"00-" + self.trace_id + b"-" + self.span_id + (b"-01" if self.sampled else b"-00")


def attempt_trace(headers: Sequence[tuple[str, str]], ids: TraceIds) -> AttemptTrace:
    """The attempt's span in the sender's trace (its kept ``traceparent``), else in a new trace."""
    for name, value in headers:
        if name.lower() == "traceparent":
            found = parse_traceparent(value.encode("latin-1"))
            if found is not None:
                trace_id, parent, sampled = found
                return AttemptTrace(trace_id, ids.span_id(), parent, sampled)
            break
    # Deliveries are few next to requests: a random trace id costs nothing that matters here.
    return AttemptTrace(os.urandom(16).hex().encode(), ids.span_id(), None, ids.sample())


class DeliverySpans(Protocol):
    """What traces delivery attempts (observe/tracing.py)."""

    def begin(self, claim: DeliveryClaim) -> AttemptTrace | None:
        """The attempt's trace; None while export is off."""

    def end(
        self, trace: AttemptTrace, claim: DeliveryClaim, result: Result, started: float, ended: float
    ) -> None:
        """The attempt ended (``started`` and ``ended`` in epoch seconds): its span, if sampled."""
