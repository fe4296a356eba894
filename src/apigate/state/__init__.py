"""Hot, short-lived state (replay windows, counters, change notices): memory or Redis; see base.py."""

from __future__ import annotations

from apigate.state.base import Script, StateBackend, Subscription
from apigate.state.calls import same_slot
from apigate.state.errors import StateUnavailable
from apigate.state.urls import ACCEPTED_URLS, check_state_url

__all__ = [
    "ACCEPTED_URLS",
    "Script",
    "StateBackend",
    "StateUnavailable",
    "Subscription",
    "check_state_url",
    "open_state",
    "same_slot",
]


def open_state(url: str) -> StateBackend:
    """The backend for a URL, not yet opened: the caller awaits ``open()``."""
    if check_state_url(url) == "memory://":
        from apigate.state.memory import MemoryState

        return MemoryState()
    # Imported here so that a gateway without Redis never loads redis-py.
    from apigate.state.redis import RedisState

    return RedisState(url)
