"""The change feed: how readers that keep entities in memory learn that they moved.

The data plane never reads the store per request: it keeps entities in process and reloads them
when ``change_version`` moves, which every write of consumers, keys, credentials, revoked tokens
and settings advances (a feed that works the same on both backends).
"""

from __future__ import annotations

from typing import Protocol


class ChangeFeed(Protocol):
    async def change_version(self) -> int:
        """A number that grows with every write; readers reload when it moves."""
