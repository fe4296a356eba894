"""Hot, short-lived state (replay windows, counters, change notices): memory or Redis; see base.py."""

from __future__ import annotations

from apigate.state.base import Script, StateBackend, StateUnavailable, Subscription

__all__ = ["ACCEPTED_URLS", "Script", "StateBackend", "StateUnavailable", "Subscription", "open_state"]

ACCEPTED_URLS = "memory://, redis://[:password@]host:port/db, rediss://... (TLS), unix:///path/redis.sock"


def open_state(url: str) -> StateBackend:
    """The backend for a URL, not yet opened: the caller awaits ``open()``."""
    # Imported here so that a gateway without Redis never loads redis-py.
    if url == "memory://":
        from apigate.state.memory import MemoryState

        return MemoryState()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from apigate.state.redis import RedisState

        return RedisState(url)
    scheme = url.partition("://")[0] if "://" in url else "(none)"  # the rest may hold a password
    raise ValueError(f"unsupported state URL scheme {scheme}; accepted forms: {ACCEPTED_URLS}")
