"""Versioned schema migrations for both store backends, and the column encodings they imply.

Each step is ``(version, sqlite_sql, postgres_sql)``. Steps are applied in order at open, in one
transaction, and recorded in ``schema_version``; a step already recorded is never run again, so
opening is idempotent, and a step missing below a recorded one (steps developed side by side)
still runs. Append new steps; never edit an applied one.

Lists and dicts are stored as JSON text (``json`` on PostgreSQL, which keeps the text verbatim,
unlike ``jsonb``) so that both backends round-trip values the same way.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from apigate.store.base import (
    ApiKey,
    Consumer,
    Credential,
    DeliveryOutcome,
    RevokedToken,
    WebhookDestinationState,
    WebhookEventQuery,
    WebhookEventSummary,
)

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
REVOKED_TOKEN_COLUMNS = "jti, expires_at, reason, created_at"
# Revoking again replaces the end and the reason; created_at stays the first revocation's.
REVOKED_TOKEN_UPSERT = (
    f"INSERT INTO revoked_tokens ({REVOKED_TOKEN_COLUMNS}) VALUES ({{}}, {{}}, {{}}, {{}}) "
    "ON CONFLICT (jti) DO UPDATE SET expires_at = excluded.expires_at, reason = excluded.reason"
)


def revoked_token_to_row(token: RevokedToken) -> tuple[Any, ...]:
    """Values in REVOKED_TOKEN_COLUMNS order."""
    return (token.jti, _optional_float(token.expires_at), token.reason, float(token.created_at))


def revoked_token_from_row(row: Any) -> RevokedToken:
    return RevokedToken(
        jti=row[0], expires_at=_optional_float(row[1]), reason=row[2], created_at=float(row[3])
    )


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
CREDENTIAL_COLUMNS = "id, consumer_id, kind, username, hash, scopes, created_at"
# Replacing keeps the owner: a username another consumer holds is not taken over (no row changes).
CREDENTIAL_UPSERT = (
    f"INSERT INTO credentials ({CREDENTIAL_COLUMNS}) VALUES ({{}}, {{}}, {{}}, {{}}, {{}}, {{}}, {{}}) "
    "ON CONFLICT (id) DO UPDATE SET hash = excluded.hash, scopes = excluded.scopes, "
    "created_at = excluded.created_at "
    "WHERE credentials.consumer_id = excluded.consumer_id"
)
USERNAME_TAKEN_MESSAGE = "this username belongs to another consumer"


def credential_to_row(credential: Credential) -> tuple[Any, ...]:
    """Values in CREDENTIAL_COLUMNS order."""
    return (
        credential.id,
        credential.consumer_id,
        credential.kind,
        credential.username,
        credential.hash,
        _json(list(credential.scopes)),
        float(credential.created_at),
    )


def credential_from_row(row: Any) -> Credential:
    return Credential(
        consumer_id=row[1],
        kind=row[2],
        username=row[3],
        hash=row[4],
        scopes=tuple(orjson.loads(row[5])),
        created_at=float(row[6]),
    )


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

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, _SQLITE_V1, _POSTGRES_V1),
    (2, _SQLITE_V2, _POSTGRES_V2),
    (3, _SQLITE_V3, _POSTGRES_V3),
    (4, _SQLITE_V4, _POSTGRES_V4),
    (5, _SQLITE_V5, _POSTGRES_V5),
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


# -- webhooks: SQL and encodings shared by both backends ---------------------------------------------
# Placeholders differ (? and $n), so shared statements are built by functions given a placeholder maker.

WEBHOOK_EVENT_STATE_SQL = """CASE
    WHEN NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event = e.id) THEN 'filtered'
    WHEN EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event = e.id AND d.state = 'dead') THEN 'dead'
    WHEN EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event = e.id AND d.state = 'pending')
        THEN 'pending'
    ELSE 'delivered' END"""


def webhook_event_select(query: WebhookEventQuery, param: Callable[[int], str]) -> tuple[str, list[Any]]:
    """SELECT of (id, source, event_id, event_type, received_at, state, size) for a query, newest
    first; ``param(n)`` spells the n-th parameter (1-based)."""
    conditions: list[str] = []
    args: list[Any] = []

    def bind(value: Any) -> str:
        args.append(value)
        return param(len(args))

    for column, value in (
        ("source", query.source),
        ("event_type", query.event_type),
        ("event_id", query.event_id),
    ):
        if value is not None:
            conditions.append(f"e.{column} = {bind(value)}")
    if query.keys is not None:
        pairs = ", ".join(f"({bind(source)}, {bind(event_id)})" for source, event_id in query.keys)
        conditions.append(f"(e.source, e.event_id) IN (VALUES {pairs})" if pairs else "FALSE")
    if query.received_after is not None:
        conditions.append(f"e.received_at >= {bind(query.received_after)}")
    if query.received_before is not None:
        conditions.append(f"e.received_at < {bind(query.received_before)}")
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    sql = (
        "SELECT * FROM (SELECT e.id, e.source, e.event_id, e.event_type, e.received_at, "
        f"{WEBHOOK_EVENT_STATE_SQL} AS state, length(e.body) AS size FROM webhook_events e {where}) AS x"
    )
    if query.state is not None:
        sql += f" WHERE x.state = {bind(query.state)}"
    sql += " ORDER BY x.received_at DESC, x.id DESC"
    if query.limit is not None:
        sql += f" LIMIT {bind(query.limit)}"
    return sql, args


def webhook_summary_from_row(row: Any) -> WebhookEventSummary:
    """From a row of ``webhook_event_select`` (its first column, the row id, is skipped)."""
    return WebhookEventSummary(
        source=row[1],
        event_id=row[2],
        event_type=row[3],
        received_at=float(row[4]),
        state=row[5],
        size=int(row[6]),
    )


def encode_headers(headers: tuple[tuple[str, str], ...]) -> str:
    return _json([list(pair) for pair in headers])


def decode_headers(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((name, value) for name, value in orjson.loads(text))


# A batch's outcomes fold into one row per destination (see ``destination_health_rows``); the
# update keeps the newest success and starts the failure clock only at a failure after it, so a
# late outcome of an attempt that overlapped a success never makes the clock start too early.
DESTINATION_HEALTH_COLUMNS = "name, last_success_at, failing_since, last_error, last_error_at"
DESTINATION_HEALTH_UPSERT = (
    "INSERT INTO webhook_destinations (" + DESTINATION_HEALTH_COLUMNS + ") {rows} "
    "ON CONFLICT (name) DO UPDATE SET "
    "last_success_at = CASE WHEN webhook_destinations.last_success_at IS NULL "
    "OR excluded.last_success_at > webhook_destinations.last_success_at "
    "THEN excluded.last_success_at ELSE webhook_destinations.last_success_at END, "
    "failing_since = CASE WHEN excluded.last_success_at IS NOT NULL THEN excluded.failing_since "
    "WHEN webhook_destinations.failing_since IS NOT NULL THEN webhook_destinations.failing_since "
    "WHEN webhook_destinations.last_success_at IS NULL "
    "OR excluded.failing_since > webhook_destinations.last_success_at THEN excluded.failing_since "
    # The batch's first failure began before the stored success (attempts overlap): its newest then.
    "WHEN excluded.last_error_at > webhook_destinations.last_success_at THEN excluded.last_error_at END, "
    "last_error = COALESCE(excluded.last_error, webhook_destinations.last_error), "
    "last_error_at = COALESCE(excluded.last_error_at, webhook_destinations.last_error_at)"
)

# Statements with one "{}" per parameter, for the backend's placeholders.
DESTINATION_DISABLED = "SELECT 1 FROM webhook_destinations w WHERE w.name = {} AND w.disabled_at IS NOT NULL"
DISABLE_FAILING_DESTINATION = (
    "UPDATE webhook_destinations SET disabled_at = {} "
    "WHERE name = {} AND disabled_at IS NULL AND failing_since <= {}"
)
# Enabled again, a destination starts a new failure window, and its backlog is due at once, in
# the order the events arrived (equal next_at: claims then go by id).
ENABLE_DESTINATION = (
    "UPDATE webhook_destinations SET disabled_at = NULL, failing_since = NULL "
    "WHERE name = {} AND disabled_at IS NOT NULL"
)
RESUME_DESTINATION_DELIVERIES = (
    "UPDATE webhook_deliveries SET next_at = {} WHERE destination = {} AND state = 'pending'"
)

WEBHOOK_DESTINATIONS_SELECT = (
    "SELECT n.name, w.disabled_at, w.failing_since, w.last_success_at, w.last_error, w.last_error_at, "
    "COALESCE(p.pending, 0) FROM (SELECT name FROM webhook_destinations "
    "UNION SELECT destination FROM webhook_deliveries WHERE state = 'pending') AS n "
    "LEFT JOIN webhook_destinations w ON w.name = n.name "
    "LEFT JOIN (SELECT destination, count(*) AS pending FROM webhook_deliveries "
    "WHERE state = 'pending' GROUP BY destination) AS p ON p.destination = n.name "
    "ORDER BY n.name"
)


def destination_health_rows(outcomes: Sequence[DeliveryOutcome]) -> list[tuple[Any, ...]]:
    """Per destination of the batch: (name, its newest success, the first failure after that
    success, the newest failure's error and time), as DESTINATION_HEALTH_COLUMNS."""
    by_name: dict[str, list[DeliveryOutcome]] = {}
    for outcome in outcomes:
        by_name.setdefault(outcome.destination, []).append(outcome)
    rows = []
    for name, batch in by_name.items():
        last_success = max((o.started_at for o in batch if o.state == "delivered"), default=None)
        failures = sorted((o for o in batch if o.state != "delivered"), key=lambda o: o.started_at)
        since = [o.started_at for o in failures if last_success is None or o.started_at > last_success]
        newest = failures[-1] if failures else None
        rows.append(
            (
                name,
                last_success,
                since[0] if since else None,
                None if newest is None else newest.error or f"status {newest.status}",
                None if newest is None else newest.started_at,
            )
        )
    return rows


def destination_state_from_row(row: Any) -> WebhookDestinationState:
    return WebhookDestinationState(*row[:6], pending=int(row[6]))
