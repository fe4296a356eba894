"""Durable entities (consumers, API keys, settings) behind one async interface; see base.py."""

from __future__ import annotations

from apigate.store.base import ApiKey, Consumer, Store

__all__ = ["ApiKey", "Consumer", "Store", "open_store"]

ACCEPTED_URLS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, "
    "postgresql://user@host:port/dbname (or postgres://...)"
)


def open_store(url: str) -> Store:
    """The Store for a URL, not yet opened: the caller awaits ``open()`` (connect and migrate)."""
    # Imported here so that a SQLite deployment never loads asyncpg, and the reverse.
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path or path == ":memory:":
            raise ValueError(f"store URL {url!r} names no database file; accepted forms: {ACCEPTED_URLS}")
        from apigate.store.sqlite import SqliteStore

        return SqliteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        from apigate.store.postgres import PostgresStore

        return PostgresStore(url)
    # Name only the scheme: the rest of a URL may hold a password.
    scheme = url.partition("://")[0] if "://" in url else "(none)"
    raise ValueError(f"unsupported store URL scheme {scheme}; accepted forms: {ACCEPTED_URLS}")
