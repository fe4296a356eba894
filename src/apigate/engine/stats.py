"""Counters kept in process; /stats shows them (merging across workers arrives with observability)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any


class Stats:
    __slots__ = (
        "by_route",
        "by_status_class",
        "errors",
        "requests_total",
        "retries",
        "started_at",
        "timeouts",
    )

    def __init__(self) -> None:
        self.started_at = time.time()
        self.requests_total = 0
        self.by_status_class = [0] * 6  # index = status // 100
        self.errors = 0
        self.retries = 0
        self.timeouts = 0

    def count_error(self, status: int) -> None:
        """A response the gateway made because something failed (4xx/5xx of its own)."""
        self.errors += 1

    def snapshot(self, connections: int, active: int, routes: dict[str, int]) -> dict[str, Any]:
        return {
            "requests_total": self.requests_total,
            "responses": {f"{i}xx": n for i, n in enumerate(self.by_status_class) if i},
            "errors": self.errors,
            "retries": self.retries,
            "timeouts": self.timeouts,
            "routes": routes,
            "connections_open": connections,
            "requests_in_flight": active,
            "started_at": datetime.fromtimestamp(self.started_at, UTC).isoformat(),
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }
