"""Versioned schema migrations for both store backends.

Each step is ``(version, sqlite_sql, postgres_sql)``. Steps are applied in order at open, in one
transaction, and recorded in ``schema_version``; a step already recorded is never run again, so
opening is idempotent, and a step missing below a recorded one (steps developed side by side)
still runs. Append new steps; never edit an applied one. How records map to these columns is in
``rows.py``.
"""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING

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

# -- version 2: revoked JWT ids (the jwt policy's jti denylist) ----------------------------------------
_REVOKED_TOKENS_V2 = """
CREATE TABLE revoked_tokens (
    jti         TEXT PRIMARY KEY,
    expires_at  {real},
    reason      TEXT,
    created_at  {real} NOT NULL
);
CREATE INDEX revoked_tokens_expires_at ON revoked_tokens (expires_at);
"""
_SQLITE_V2 = _REVOKED_TOKENS_V2.format(real="REAL")
_POSTGRES_V2 = _REVOKED_TOKENS_V2.format(real="DOUBLE PRECISION")

# -- version 3: credentials (client secrets and login passwords, as scrypt hashes) ----------------------
# The id says what a credential is for, so setting one again replaces it: "secret:<consumer id>"
# (one client secret per consumer) and "password:<username>" (a username belongs to one consumer).
_CREDENTIALS_V3 = """
CREATE TABLE credentials (
    id           TEXT PRIMARY KEY,
    consumer_id  TEXT NOT NULL REFERENCES consumers (id) ON DELETE CASCADE,
    kind         TEXT NOT NULL CHECK (kind IN ('secret', 'password')),
    username     TEXT UNIQUE,
    hash         TEXT NOT NULL,
    scopes       {json} NOT NULL DEFAULT '[]',
    created_at   {real} NOT NULL
);
CREATE INDEX credentials_consumer_id ON credentials (consumer_id);
"""
_SQLITE_V3 = _CREDENTIALS_V3.format(real="REAL", json="TEXT")
_POSTGRES_V3 = _CREDENTIALS_V3.format(real="DOUBLE PRECISION", json="JSON")

# -- version 4: webhooks ---------------------------------------------------------------------------
# A delivery is due when state = 'pending', next_at <= now and lease_until <= now (no live claim).
# schedule_start: the attempts made before its retry schedule (re)started; a replay restarts it.
_WEBHOOKS_V4 = """
CREATE TABLE webhook_events (
    id           {serial} PRIMARY KEY,
    source       TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    event_type   TEXT,
    received_at  {real} NOT NULL,
    headers      TEXT NOT NULL DEFAULT '[]',
    body         {blob} NOT NULL,
    CONSTRAINT webhook_events_source_event_id UNIQUE (source, event_id)
);
CREATE INDEX webhook_events_received_at ON webhook_events (received_at);
CREATE TABLE webhook_deliveries (
    id           {serial} PRIMARY KEY,
    event        BIGINT NOT NULL REFERENCES webhook_events (id) ON DELETE CASCADE,
    destination  TEXT NOT NULL,
    state        TEXT NOT NULL DEFAULT 'pending',
    attempts     INTEGER NOT NULL DEFAULT 0,
    schedule_start INTEGER NOT NULL DEFAULT 0,
    next_at      {real} NOT NULL,
    lease_until  {real} NOT NULL DEFAULT 0,
    CONSTRAINT webhook_deliveries_event_destination UNIQUE (event, destination)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (destination, next_at) WHERE state = 'pending';
CREATE TABLE webhook_attempts (
    id           {serial} PRIMARY KEY,
    delivery     BIGINT NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt      INTEGER NOT NULL,
    started_at   {real} NOT NULL,
    latency      {real} NOT NULL,
    status       INTEGER,
    error        TEXT
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery);
CREATE TABLE webhook_leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  {real} NOT NULL
);
"""
_SQLITE_V4 = _WEBHOOKS_V4.format(serial="INTEGER", real="REAL", blob="BLOB")
_POSTGRES_V4 = _WEBHOOKS_V4.format(serial="BIGSERIAL", real="DOUBLE PRECISION", blob="BYTEA")

# -- version 5: webhook destinations' health, and which are disabled ------------------------------
# A table, not settings: it is written with every batch of attempt outcomes (a settings write would
# move the change feed and reload every consumer registry each time), and the claim query reads
# disabled_at in SQL, so a destination disabled by one node stops being claimed by all at once.
_WEBHOOKS_V5 = """
CREATE TABLE webhook_destinations (
    name            TEXT PRIMARY KEY,
    disabled_at     {real},
    failing_since   {real},
    last_success_at {real},
    last_error      TEXT,
    last_error_at   {real}
);
"""
_SQLITE_V5 = _WEBHOOKS_V5.format(real="REAL")
_POSTGRES_V5 = _WEBHOOKS_V5.format(real="DOUBLE PRECISION")

# -- version 6: quota usage (memory-backed quotas, written behind by every gateway process) ----------
# A counter is one row; writers add to ``used``. ``version`` marks each change (a write, a reset) so a
# process reads only what changed since its last read: SQLite takes versions from a one-row counter
# under its write lock, PostgreSQL from a sequence under an advisory lock held to commit, so
# versions commit in order. Rows whose period ended (``expires_at``) are deleted by the writers.
_QUOTAS_V6 = """
CREATE TABLE quota_usage (
    route        TEXT NOT NULL,
    quota        TEXT NOT NULL,
    counter_key  TEXT NOT NULL,
    period       TEXT NOT NULL,
    used         BIGINT NOT NULL,
    expires_at   {real} NOT NULL,
    version      BIGINT NOT NULL,
    PRIMARY KEY (route, quota, counter_key, period)
);
CREATE INDEX quota_usage_by_version ON quota_usage (version);
CREATE INDEX quota_usage_expires_at ON quota_usage (expires_at);
"""
_SQLITE_V6 = (
    _QUOTAS_V6.format(real="REAL")
    + """
CREATE TABLE quota_usage_version (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    version  INTEGER NOT NULL
);
INSERT INTO quota_usage_version (id, version) VALUES (1, 0);
"""
)
_POSTGRES_V6 = _QUOTAS_V6.format(real="DOUBLE PRECISION") + "CREATE SEQUENCE quota_usage_version;\n"

# -- version 7: usage analytics (requests, errors, bytes, latency per bucket and identity) ---------
# granularity is the bucket's length in seconds (60, 3600, 86400) and bucket_start a multiple of it.
# Identities a request did not have are "", so that every key column can be in the primary key.
_USAGE_V7 = """
CREATE TABLE usage_buckets (
    granularity     INTEGER NOT NULL,
    bucket_start    BIGINT NOT NULL,
    route           TEXT NOT NULL,
    consumer        TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    tenant          TEXT NOT NULL,
    requests        BIGINT NOT NULL,
    client_errors   BIGINT NOT NULL,
    server_errors   BIGINT NOT NULL,
    bytes_in        BIGINT NOT NULL,
    bytes_out       BIGINT NOT NULL,
    latency_sum_ms  {real} NOT NULL,
    latency_max_ms  {real} NOT NULL,
    PRIMARY KEY (granularity, bucket_start, route, consumer, key_id, tenant)
);
CREATE INDEX usage_buckets_start ON usage_buckets (bucket_start);
"""
_SQLITE_V7 = _USAGE_V7.format(real="REAL")
_POSTGRES_V7 = _USAGE_V7.format(real="DOUBLE PRECISION")

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, _SQLITE_V1, _POSTGRES_V1),
    (2, _SQLITE_V2, _POSTGRES_V2),
    (3, _SQLITE_V3, _POSTGRES_V3),
    (4, _SQLITE_V4, _POSTGRES_V4),
    (5, _SQLITE_V5, _POSTGRES_V5),
    (6, _SQLITE_V6, _POSTGRES_V6),
    (7, _SQLITE_V7, _POSTGRES_V7),
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
        done = {row[0] for row in conn.execute("SELECT version FROM schema_version")}
        for version, sqlite_sql, _ in MIGRATIONS:
            if version in done:
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
        done = {row[0] for row in await conn.fetch("SELECT version FROM schema_version")}
        for version, _, postgres_sql in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(postgres_sql)  # no arguments: simple protocol, several statements
            await conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)", version, time.time()
            )
            applied.append(version)
    return applied
