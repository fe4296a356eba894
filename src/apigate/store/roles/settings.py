"""Gateway settings: named values every process shares, such as the key-hash secret, the webhook
signing secret and the pollers' cursors."""

from __future__ import annotations

from typing import Protocol


class SettingStore(Protocol):
    async def get_setting(self, name: str) -> str | None: ...

    async def set_setting(self, name: str, value: str, only_if_absent: bool = False) -> str:
        """Store a setting; with only_if_absent the first writer wins. Returns the stored value."""
