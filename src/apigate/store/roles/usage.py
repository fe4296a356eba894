"""Usage analytics: requests, errors, bytes and latency per route, consumer, API key and tenant, in
time buckets.

Gateways add to minute buckets (each process writes behind, one batch per flush); a rollup moves
minute rows older than an age into hour rows, hour rows into day rows, and deletes day rows past
the retention. Every write and every move is an addition in one transaction, so a row written
late (a flush retried after its minute was rolled up) joins its hour at the next rollup, and two
rollups at once never count a row twice.

Identities a request did not have (no consumer, no key, no tenant, no matching route) are stored
as "" and read back as None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

MINUTE: Final = 60
HOUR: Final = 3600
DAY: Final = 86400
GRANULARITIES: Final = {"minute": MINUTE, "hour": HOUR, "day": DAY}
GRANULARITY_NAMES: Final = {seconds: name for name, seconds in GRANULARITIES.items()}
# What a query may group by, and the column each one reads.
GROUP_COLUMNS: Final = {"consumer": "consumer", "key": "key_id", "tenant": "tenant", "route": "route"}


@dataclass(frozen=True, slots=True)
class UsageCounts:
    """What a bucket counts. ``client_errors`` are 4xx answers, ``server_errors`` 5xx (the
    gateway's own 502/503/504 included); a request whose client left before any answer counts in
    ``requests`` only."""

    requests: int = 0
    client_errors: int = 0
    server_errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    latency_sum_ms: float = 0.0
    latency_max_ms: float = 0.0

    @property
    def latency_avg_ms(self) -> float:
        return self.latency_sum_ms / self.requests if self.requests else 0.0


@dataclass(frozen=True, slots=True)
class UsageBucket:
    """Counts to add to one bucket: ``granularity`` seconds (MINUTE, HOUR, DAY) from ``start``
    (unix seconds, a multiple of the granularity, UTC)."""

    granularity: int
    start: int
    route: str | None
    consumer: str | None
    key_id: str | None
    tenant: str | None
    counts: UsageCounts


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """Buckets that start in [``start``, ``end``) (unix seconds), summed into buckets of
    ``granularity`` seconds (None: one total over the range) and grouped by ``group_by`` (names of
    GROUP_COLUMNS). Rows already rolled up into coarser buckets are returned in those."""

    start: int
    end: int
    group_by: tuple[str, ...] = ()
    granularity: int | None = MINUTE


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One answer of a query: the bucket (its start and granularity; for a total, the query's start
    and None), the grouped values (by name of GROUP_COLUMNS) and the counts."""

    start: int
    granularity: int | None
    groups: dict[str, str | None]
    counts: UsageCounts


@dataclass(frozen=True, slots=True)
class RollupCutoffs:
    """Minute rows that start before ``hours_before`` become hour rows, hour rows before
    ``days_before`` become day rows, day rows before ``delete_before`` are deleted (unix seconds;
    hour and day multiples, in this order)."""

    hours_before: int
    days_before: int
    delete_before: int


@dataclass(frozen=True, slots=True)
class RollupResult:
    """How many rows one rollup moved or deleted."""

    minutes_rolled: int = 0
    hours_rolled: int = 0
    days_deleted: int = 0


class UsageStore(Protocol):
    async def add_usage(self, buckets: Sequence[UsageBucket]) -> None:
        """Add every bucket's counts to its row (a new row starts at 0; the latency maximum is
        kept), in one transaction."""

    async def query_usage(self, query: UsageQuery) -> list[UsageRow]:
        """Rows ordered by bucket start, then by the grouped values."""

    async def rollup_usage(self, cutoffs: RollupCutoffs) -> RollupResult:
        """Move and delete as ``cutoffs`` say, in one transaction; runs safely beside writers and
        other rollups (each row is moved by exactly one)."""
