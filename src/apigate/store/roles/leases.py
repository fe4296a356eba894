"""Leases: a name held by one process at a time until it expires (the webhook delivery owner on
SQLite, one poller per polled source across a cluster)."""

from __future__ import annotations

from typing import Protocol


class LeaseStore(Protocol):
    async def take_lease(self, name: str, holder: str, now: float, until: float) -> bool:
        """Take or renew the lease ``name`` for ``holder`` until ``until``; False while another
        holder's lease has not expired."""
