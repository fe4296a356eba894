"""Quota usage: what memory-backed quotas have counted, per route, quota, key and period, written
behind by each gateway process so that counts survive restarts and reach the other processes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class QuotaUsage:
    """One counter: ``used`` units of quota ``quota`` (on ``route``; "" for a quota shared by every
    route) by ``key`` in the period ``period`` (``2026-03-29``, ``2026-03``...). The row may be
    deleted once ``expires_at`` (unix seconds, the period's end and a grace) has passed."""

    route: str
    quota: str
    key: str
    period: str
    used: int
    expires_at: float


class QuotaStore(Protocol):
    async def sync_quota_usage(
        self, added: Sequence[QuotaUsage], since: int, now: float
    ) -> tuple[int, list[QuotaUsage]]:
        """Add each of ``added``'s ``used`` to its counter (a new counter starts at 0), delete the
        counters that expired before ``now``, and return the usage version and every counter that
        changed after version ``since`` (all of them for 0), in one transaction. Versions only grow
        and commit in order, so a reader that passes the version it last got misses no change."""

    async def list_quota_usage(
        self, route: str | None = None, key: str | None = None, now: float = 0.0
    ) -> list[QuotaUsage]:
        """The counters not expired at ``now``, of one route and one key if given."""

    async def reset_quota_usage(self, route: str, quota: str, period: str, key: str | None = None) -> int:
        """Set the counters of ``quota`` on ``route`` in ``period`` (of one key, or of all) to 0, as a
        change that running gateways read; how many there were."""
