"""The store: entities that must survive restarts, behind small async interfaces, one per role.

Each role (``roles/``) is the type its users depend on: consumers and keys, credentials, revoked
tokens, settings, the change feed, webhooks, leases, quota usage, usage
analytics. Two backends implement every role: SQLite in
WAL mode (embedded, the default) and PostgreSQL (a cluster of gateways on several machines).
``Store`` is all of them together with opening and closing; ``open_store`` returns one such
object, so a process holds one connection (SQLite) or one pool (PostgreSQL) for every role.
"""

from __future__ import annotations

from apigate.store.base import Store
from apigate.store.roles.consumers import ApiKey, Consumer

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
