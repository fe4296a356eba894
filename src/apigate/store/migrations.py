"""Versioned schema migrations for both store backends, and the column encodings they imply.

Each step is ``(version, sqlite_sql, postgres_sql)``. Steps are applied in order at open, in one
transaction, and recorded in ``schema_version``; a step already recorded is never run again, so
opening is idempotent. Append new steps; never edit an applied one.

Lists and dicts are stored as JSON text (``json`` on PostgreSQL, which keeps the text verbatim,
unlike ``jsonb``) so that both backends round-trip values the same way.
"""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING, Any

import orjson

from apigate.store.base import ApiKey, Consumer

if TYPE_CHECKING:
    import asyncpg

# Key of the transaction-scoped advisory lock that serialises migrators (several gateway nodes
# starting at once). Advisory locks are per database, so stores on other databases don't contend.
MIGRATION_LOCK_KEY = 0x61706967_6D696772  # "apigmigr"

_SQLITE_V1 = """
CREATE TABLE consumers (
    id          TEXT PRIMARY KEY,
    tenant      TEXT,
    groups      TEXT NOT NULL DEFAULT '[]',
    metadata    TEXT NOT NULL DEFAULT '{}',
    disabled    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL DEFAULT 0
);
CREATE INDEX consumers_tenant ON consumers (tenant);
CREATE TABLE api_keys (
    id             TEXT PRIMARY KEY,
    consumer_id    TEXT NOT NULL REFERENCES consumers (id) ON DELETE CASCADE,
    hash           TEXT NOT NULL UNIQUE,
    prefix         TEXT NOT NULL,
    scopes         TEXT NOT NULL DEFAULT '[]',
    allowed_cidrs  TEXT NOT NULL DEFAULT '[]',
    time_windows   TEXT NOT NULL DEFAULT '[]',
    expires_at     REAL,
    revoked_at     REAL,
    created_at     REAL NOT NULL DEFAULT 0,
    rotated_from   TEXT
);
CREATE INDEX api_keys_consumer_id ON api_keys (consumer_id);
CREATE TABLE settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
-- AUTOINCREMENT: ids are never reused, even if old rows are pruned, so the version only grows.
CREATE TABLE changes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    entity     TEXT NOT NULL,
    entity_id  TEXT NOT NULL,
    at         REAL NOT NULL
);
"""

_POSTGRES_V1 = """
CREATE TABLE consumers (
    id          TEXT PRIMARY KEY,
    tenant      TEXT,
    groups      JSON NOT NULL DEFAULT '[]',
    metadata    JSON NOT NULL DEFAULT '{}',
    disabled    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE INDEX consumers_tenant ON consumers (tenant);
CREATE TABLE api_keys (
    id             TEXT PRIMARY KEY,
    consumer_id    TEXT NOT NULL REFERENCES consumers (id) ON DELETE CASCADE,
    hash           TEXT NOT NULL CONSTRAINT api_keys_hash_unique UNIQUE,
    prefix         TEXT NOT NULL,
    scopes         JSON NOT NULL DEFAULT '[]',
    allowed_cidrs  JSON NOT NULL DEFAULT '[]',
    time_windows   JSON NOT NULL DEFAULT '[]',
    expires_at     DOUBLE PRECISION,
    revoked_at     DOUBLE PRECISION,
    created_at     DOUBLE PRECISION NOT NULL DEFAULT 0,
    rotated_from   TEXT
);
CREATE INDEX api_keys_consumer_id ON api_keys (consumer_id);
CREATE TABLE settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE changes (
    id         BIGSERIAL PRIMARY KEY,
    entity     TEXT NOT NULL,
    entity_id  TEXT NOT NULL,
    at         DOUBLE PRECISION NOT NULL
);
"""

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, _SQLITE_V1, _POSTGRES_V1),
]

_SQLITE_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
)
_POSTGRES_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version "
    "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
)


def _sqlite_statements(script: str) -> list[str]:
    """Split a script into statements (sqlite3 runs one per execute; executescript would commit)."""
    statements: list[str] = []
    current = ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            # Comment-only fragments are complete too; skip them, they are not statements.
            lines = [line for line in current.splitlines() if not line.strip().startswith("--")]
            if "".join(lines).strip(" \n;"):
                statements.append(current.strip())
            current = ""
    return statements


def migrate_sqlite(conn: sqlite3.Connection) -> list[int]:
    """Apply pending steps on a connection in autocommit mode; returns the versions applied.

    BEGIN IMMEDIATE takes the write lock first, so concurrent migrators (several processes on one
    file) queue on busy_timeout and the second one finds the work done.
    """
    applied: list[int] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_SQLITE_VERSION_TABLE)
        current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
        for version, sqlite_sql, _ in MIGRATIONS:
            if version <= current:
                continue
            for statement in _sqlite_statements(sqlite_sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, time.time())
            )
            applied.append(version)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return applied


async def migrate_postgres(conn: asyncpg.Connection) -> list[int]:
    """Apply pending steps in one transaction under an advisory lock; returns the versions applied."""
    applied: list[int] = []
    async with conn.transaction():
        # Held until commit: a second node waits here, then sees the recorded versions.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(_POSTGRES_VERSION_TABLE)
        current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        for version, _, postgres_sql in MIGRATIONS:
            if version <= current:
                continue
            await conn.execute(postgres_sql)  # no arguments: simple protocol, several statements
            await conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)", version, time.time()
            )
            applied.append(version)
    return applied


# -- column encodings shared by both backends ---------------------------------------------------

CONSUMER_COLUMNS = "id, tenant, groups, metadata, disabled, created_at"
KEY_COLUMNS = (
    "id, consumer_id, hash, prefix, scopes, allowed_cidrs, time_windows, "
    "expires_at, revoked_at, created_at, rotated_from"
)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def consumer_to_row(consumer: Consumer) -> tuple[Any, ...]:
    """Values in CONSUMER_COLUMNS order."""
    return (
        consumer.id,
        consumer.tenant,
        _json(list(consumer.groups)),
        _json(consumer.metadata),
        bool(consumer.disabled),
        float(consumer.created_at),
    )


def consumer_from_row(row: Any) -> Consumer:
    return Consumer(
        id=row[0],
        tenant=row[1],
        groups=tuple(orjson.loads(row[2])),
        metadata=orjson.loads(row[3]),
        disabled=bool(row[4]),
        created_at=float(row[5]),
    )


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def key_to_row(key: ApiKey) -> tuple[Any, ...]:
    """Values in KEY_COLUMNS order."""
    return (
        key.id,
        key.consumer_id,
        key.hash,
        key.prefix,
        _json(list(key.scopes)),
        _json(list(key.allowed_cidrs)),
        _json(list(key.time_windows)),
        _optional_float(key.expires_at),
        _optional_float(key.revoked_at),
        float(key.created_at),
        key.rotated_from,
    )


def key_from_row(row: Any) -> ApiKey:
    return ApiKey(
        id=row[0],
        consumer_id=row[1],
        hash=row[2],
        prefix=row[3],
        scopes=tuple(orjson.loads(row[4])),
        allowed_cidrs=tuple(orjson.loads(row[5])),
        time_windows=tuple(orjson.loads(row[6])),
        expires_at=_optional_float(row[7]),
        revoked_at=_optional_float(row[8]),
        created_at=float(row[9]),
        rotated_from=row[10],
    )


DUPLICATE_HASH_MESSAGE = "an API key with this hash already exists"
