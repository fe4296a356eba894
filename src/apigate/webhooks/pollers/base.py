"""What every poller shares: the events it fetches, how it commits them, how it fails, its interface."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class PolledEvent:
    event_id: str
    event_type: str | None
    body: bytes
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)


CommitPolled = Callable[[str, Sequence[PolledEvent]], Awaitable[None]]
"""``commit(source, events)`` returns once the events are durably stored (duplicates included)."""


class PollError(Exception):
    """A poll that failed; ``retry_after`` is the provider's requested pause (429), if it gave one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Poller(Protocol):
    async def poll(self) -> bool:
        """Fetch and commit one page after the cursor, then advance it; True if more are waiting."""
        ...
