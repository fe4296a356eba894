"""When a failed attempt is tried again: the route's retry policy and the upstream's retry budget.

A retry waits a backoff with full jitter (a uniform draw in [0, min(cap, base x 2^n)], as the AWS
architecture blog's "Exponential Backoff and Jitter" recommends), goes to another target when
there is one, and is allowed only while the upstream's budget holds: retries stay under a share
of the requests of the last ``window`` seconds, with a floor of a few per second (Finagle's
RetryBudget, Envoy's retry_budget), so retries cannot multiply an outage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Final

from apigate.engine.window import WindowCounts

# What went wrong with an attempt (``retry_on`` names them; statuses are matched as numbers).
CONNECT: Final = 1  # refused, unreachable or connect timeout: nothing was sent
RESET: Final = 2  # the connection closed before a response head
TIMEOUT: Final = 4  # no response head within the first-byte or per-try timeout
FAILURE_NAMES: Final = {"connect": CONNECT, "reset": RESET, "timeout": TIMEOUT}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A route's retries (see the config reference: ``retries``)."""

    attempts: int = 2  # retries after the first attempt
    on: int = CONNECT | RESET  # failure kinds retried
    statuses: frozenset[int] = field(default_factory=frozenset)  # response statuses retried
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    per_try_timeout: float = 0.0  # 0: only the first-byte and total timeouts
    idempotency_header: bytes | None = None  # lowercase; its presence makes any method retryable

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based): full jitter."""
        if self.backoff_base <= 0.0:
            return 0.0
        ceiling = min(self.backoff_max, self.backoff_base * (2.0 ** min(retry - 1, 30)))
        return random.random() * ceiling


NO_RETRIES: Final = RetryPolicy(attempts=0)


class RetryBudget:
    """Retries allowed while they stay under ``ratio`` of the requests of the last ``window``
    seconds, or under ``min_per_second`` x window, whichever is more.

    A request only adds one to ``pending`` (no clock, no window arithmetic per request); the
    requests pending are counted into the window when a retry asks, spread over the time since the
    last count (those older than the window count for their share only)."""

    __slots__ = ("counted_at", "counts", "min_per_second", "pending", "ratio")

    def __init__(
        self, ratio: float = 0.2, window: float = 10.0, min_per_second: float = 3.0, now: float = 0.0
    ) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.counts = WindowCounts(window)  # requests and retries
        self.pending = 0
        self.counted_at = now

    def request(self) -> None:
        """A request's first attempt went to the upstream."""
        self.pending += 1

    def try_retry(self, now: float) -> bool:
        """May one more retry go now? If so, it is counted."""
        pending = self.pending
        if pending:
            self.pending = 0
            elapsed = now - self.counted_at
            window = self.counts.window
            if elapsed > window:
                pending = int(pending * window / elapsed)
            self.counts.add(now, pending, 0)
        self.counted_at = now
        requests, retries = self.counts.totals(now)
        if retries >= max(self.min_per_second * self.counts.window, self.ratio * requests):
            return False
        self.counts.add(now, 0, 1)
        return True
