"""The PostgreSQL store: asyncpg with a connection pool, for gateways on several machines."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from apigate.store import rows
from apigate.store.base import Store
from apigate.store.migrations import migrate_postgres
from apigate.store.roles.consumers import ApiKey, Consumer
from apigate.store.roles.credentials import Credential
from apigate.store.roles.quotas import QuotaUsage
from apigate.store.roles.tokens import RevokedToken
from apigate.store.roles.usage import RollupCutoffs, RollupResult, UsageBucket, UsageQuery, UsageRow
from apigate.store.roles.webhooks import (
    DeliveryClaim,
    DeliveryOutcome,
    NewWebhookEvent,
    WebhookDestinationState,
    WebhookEventDetail,
    WebhookEventQuery,
    WebhookEventSummary,
)

# Serialises the final step of every write (take a change id, commit). Without it a bigserial id
# can become visible after a higher one: a reader would see max(id) move past a change it cannot
# see yet, and never reload for it. Held from nextval to commit, ids commit in order.
CHANGES_LOCK_KEY = 0x61706967_63686E67  # "apigchng"

# Held from taking a quota usage version to commit, so versions commit in order (see migrations.py).
QUOTA_LOCK_KEY = 0x61706967_71756F74  # "apigquot"

# Held by a usage rollup to commit (writers of usage hold it shared): rollups on several nodes take
# turns, and no writer adds to a row a rollup is moving.
USAGE_ROLLUP_LOCK_KEY = 0x61706967_75736167  # "apigusag"

POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 10


class PostgresStore(Store):
    """A Store on a PostgreSQL database given by a ``postgresql://`` (or ``postgres://``) DSN."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._pool: asyncpg.Pool | None = None

    @property
    def _db(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the PostgreSQL store is not open")
        return self._pool

    async def _select_rows(self, columns: str, table: str, column: str, value: str | None) -> list[Any]:
        sql, args = rows.select_rows(columns, table, column, value, "$1")
        return list(await self._db.fetch(sql, *args))

    @staticmethod
    async def _record_change(conn: asyncpg.Connection, entity: str, entity_id: str) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", CHANGES_LOCK_KEY)
        await conn.execute(
            "INSERT INTO changes (entity, entity_id, at) VALUES ($1, $2, $3)", entity, entity_id, time.time()
        )

    async def open(self) -> None:
        if self._pool is not None:
            raise RuntimeError("the PostgreSQL store is already open")
        pool = await asyncpg.create_pool(self.dsn, min_size=POOL_MIN_SIZE, max_size=POOL_MAX_SIZE)
        try:
            async with pool.acquire() as conn:
                await migrate_postgres(conn)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def ping(self) -> None:
        await self._db.fetchval("SELECT 1")

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # -- consumers ----------------------------------------------------------------------------
    async def upsert_consumer(self, consumer: Consumer) -> None:
        async with self._db.acquire() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO consumers ({rows.CONSUMER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6) "
                "ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, groups = excluded.groups, "
                "metadata = excluded.metadata, disabled = excluded.disabled, "
                "created_at = excluded.created_at",
                *rows.consumer_to_row(consumer),
            )
            await self._record_change(conn, "consumer", consumer.id)

    async def get_consumer(self, consumer_id: str) -> Consumer | None:
        row = await self._db.fetchrow(
            f"SELECT {rows.CONSUMER_COLUMNS} FROM consumers WHERE id = $1", consumer_id
        )
        return None if row is None else rows.consumer_from_row(row)

    async def list_consumers(self, tenant: str | None = None) -> list[Consumer]:
        found = await self._select_rows(rows.CONSUMER_COLUMNS, "consumers", "tenant", tenant)
        return [rows.consumer_from_row(row) for row in found]

    async def delete_consumer(self, consumer_id: str) -> bool:
        async with self._db.acquire() as conn, conn.transaction():
            deleted = await conn.fetchval("DELETE FROM consumers WHERE id = $1 RETURNING TRUE", consumer_id)
            if deleted:  # its keys go by ON DELETE CASCADE
                await self._record_change(conn, "consumer", consumer_id)
            return bool(deleted)

    # -- API keys -------------------------------------------------------------------------------
    async def add_key(self, key: ApiKey) -> None:
        row = rows.key_to_row(key)
        try:
            async with self._db.acquire() as conn, conn.transaction():
                await conn.execute(
                    f"INSERT INTO api_keys ({rows.KEY_COLUMNS}) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                    *row,
                )
                await self._record_change(conn, "api_key", key.id)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "api_keys_hash_unique":
                raise ValueError(rows.DUPLICATE_HASH_MESSAGE) from exc
            raise

    async def update_key(self, key: ApiKey) -> None:
        """Replace scopes, allowed_cidrs, time_windows, expires_at and revoked_at.

        id, consumer_id, hash, prefix, created_at and rotated_from are fixed at creation and
        ignored here. Raises KeyError if no key has this id.
        """
        row = rows.key_to_row(key)
        async with self._db.acquire() as conn, conn.transaction():
            found = await conn.fetchval(
                "UPDATE api_keys SET scopes = $1, allowed_cidrs = $2, time_windows = $3, "
                "expires_at = $4, revoked_at = $5 WHERE id = $6 RETURNING TRUE",
                *row[4:9],
                key.id,
            )
            if not found:
                raise KeyError(key.id)
            await self._record_change(conn, "api_key", key.id)

    async def get_key(self, key_id: str) -> ApiKey | None:
        row = await self._db.fetchrow(f"SELECT {rows.KEY_COLUMNS} FROM api_keys WHERE id = $1", key_id)
        return None if row is None else rows.key_from_row(row)

    async def list_keys(self, consumer_id: str | None = None) -> list[ApiKey]:
        found = await self._select_rows(rows.KEY_COLUMNS, "api_keys", "consumer_id", consumer_id)
        return [rows.key_from_row(row) for row in found]

    # -- revoked tokens (jti denylist) ------------------------------------------------------------------
    async def revoke_token(self, token: RevokedToken) -> None:
        async with self._db.acquire() as conn, conn.transaction():
            await conn.execute(
                rows.REVOKED_TOKEN_UPSERT.format("$1", "$2", "$3", "$4"), *rows.revoked_token_to_row(token)
            )
            await self._record_change(conn, "revoked_token", token.jti)

    async def list_revoked_tokens(self) -> list[RevokedToken]:
        found = await self._db.fetch(f"SELECT {rows.REVOKED_TOKEN_COLUMNS} FROM revoked_tokens ORDER BY jti")
        return [rows.revoked_token_from_row(row) for row in found]

    async def purge_revoked_tokens(self, expired_before: float) -> int:
        status = await self._db.execute("DELETE FROM revoked_tokens WHERE expires_at < $1", expired_before)
        return int(status.rpartition(" ")[2])  # "DELETE <count>"

    # -- credentials ------------------------------------------------------------------------------------
    async def set_credential(self, credential: Credential) -> None:
        upsert = rows.CREDENTIAL_UPSERT.format("$1", "$2", "$3", "$4", "$5", "$6", "$7") + " RETURNING TRUE"
        try:
            async with self._db.acquire() as conn, conn.transaction():
                if not await conn.fetchval(upsert, *rows.credential_to_row(credential)):
                    raise ValueError(rows.USERNAME_TAKEN_MESSAGE)
                await self._record_change(conn, "credential", credential.id)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "credentials_username_key":
                raise ValueError(rows.USERNAME_TAKEN_MESSAGE) from exc
            raise

    async def list_credentials(self, consumer_id: str | None = None) -> list[Credential]:
        found = await self._select_rows(rows.CREDENTIAL_COLUMNS, "credentials", "consumer_id", consumer_id)
        return [rows.credential_from_row(row) for row in found]

    async def delete_credential(self, credential_id: str) -> bool:
        async with self._db.acquire() as conn, conn.transaction():
            deleted = await conn.fetchval(
                "DELETE FROM credentials WHERE id = $1 RETURNING TRUE", credential_id
            )
            if deleted:
                await self._record_change(conn, "credential", credential_id)
            return bool(deleted)

    # -- change feed and settings -------------------------------------------------------------------
    async def change_version(self) -> int:
        return int(await self._db.fetchval("SELECT COALESCE(MAX(id), 0) FROM changes"))

    async def get_setting(self, name: str) -> str | None:
        return await self._db.fetchval("SELECT value FROM settings WHERE name = $1", name)

    async def set_setting(self, name: str, value: str, only_if_absent: bool = False) -> str:
        if only_if_absent:
            upsert = "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING"
        else:
            upsert = (
                "INSERT INTO settings (name, value) VALUES ($1, $2) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
            )
        async with self._db.acquire() as conn, conn.transaction():
            # ON CONFLICT waits for a concurrent inserter to finish; the SELECT (a new snapshot under
            # READ COMMITTED) then sees whichever value won.
            inserted = await conn.fetchval(upsert + " RETURNING TRUE", name, value)
            if inserted:
                await self._record_change(conn, "setting", name)
            stored = await conn.fetchval("SELECT value FROM settings WHERE name = $1", name)
        return stored

    # -- webhooks -----------------------------------------------------------------------------------
    # Every process may claim: FOR UPDATE SKIP LOCKED hands each due row to one claimer, and the
    # committed lease keeps it from others until the attempt ends or the claimer is presumed dead.
    # Batches travel as arrays (unnest) and each write is one statement: one round trip, one commit.
    delivery_needs_owner = False

    async def add_webhook_events(self, events: Sequence[NewWebhookEvent]) -> list[bool]:
        first: dict[tuple[str, str], NewWebhookEvent] = {}
        for event in events:
            first.setdefault((event.source, event.event_id), event)
        unique = list(first.values())
        deliveries = [(event, name) for event in unique for name in event.destinations]
        # One statement (one round trip, one commit): the events, then the deliveries of the new ones.
        found = await self._db.fetch(
            "WITH new AS ("
            "INSERT INTO webhook_events (source, event_id, event_type, received_at, headers, body) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::text[], $6::bytea[]) "
            "ON CONFLICT (source, event_id) DO NOTHING RETURNING id, source, event_id), "
            "deliveries AS (INSERT INTO webhook_deliveries (event, destination, next_at) "
            "SELECT new.id, d.destination, d.next_at FROM new "
            "JOIN unnest($7::text[], $8::text[], $9::text[], $10::float8[]) "
            "AS d (source, event_id, destination, next_at) "
            "ON d.source = new.source AND d.event_id = new.event_id) "
            "SELECT source, event_id FROM new",
            [e.source for e in unique],
            [e.event_id for e in unique],
            [e.event_type for e in unique],
            [e.received_at for e in unique],
            [rows.encode_headers(e.headers) for e in unique],
            [e.body for e in unique],
            [e.source for e, _ in deliveries],
            [e.event_id for e, _ in deliveries],
            [name for _, name in deliveries],
            [e.first_due for e, _ in deliveries],
        )
        new = {(row[0], row[1]) for row in found}
        # The first occurrence of a key is the one that may be new; later ones in the batch are not.
        return [first[(e.source, e.event_id)] is e and (e.source, e.event_id) in new for e in events]

    async def claim_webhook_deliveries(
        self,
        destination: str,
        limit: int,
        now: float,
        lease_until: float,
        fifo_sources: frozenset[str] = frozenset(),
    ) -> list[DeliveryClaim]:
        fifo_join, fifo_condition = "", ""
        fifo_args: tuple[list[str], ...] = ()
        if fifo_sources:
            # Of a FIFO source only the delivery of its oldest pending event is a candidate. A claim
            # leaves it pending, so while it is leased (or waits for a retry) every claimer still
            # sees it as the head and hands out nothing behind it.
            fifo_join = "JOIN webhook_events c ON c.id = q.event "
            fifo_condition = (
                "AND (c.source <> ALL($5::text[]) OR q.event IN ("
                "SELECT min(d2.event) FROM webhook_deliveries d2 JOIN webhook_events e2 ON e2.id = d2.event "
                "WHERE d2.destination = $1 AND d2.state = 'pending' AND e2.source = ANY($5::text[]) "
                "GROUP BY e2.source)) "
            )
            fifo_args = (sorted(fifo_sources),)
        found = await self._db.fetch(
            "UPDATE webhook_deliveries d SET attempts = d.attempts + 1, lease_until = $4 "
            "FROM webhook_events e WHERE e.id = d.event AND d.id IN ("
            f"SELECT q.id FROM webhook_deliveries q {fifo_join}"
            "WHERE q.destination = $1 AND q.state = 'pending' AND q.next_at <= $2 AND q.lease_until <= $2 "
            f"AND NOT EXISTS ({rows.DESTINATION_DISABLED.format('$1')}) {fifo_condition}"
            "ORDER BY q.next_at, q.id LIMIT $3 FOR UPDATE OF q SKIP LOCKED) "
            "RETURNING d.id, d.attempts, d.attempts - d.schedule_start, e.source, e.event_id, e.event_type, "
            "e.received_at, e.headers, e.body",
            destination,
            now,
            limit,
            lease_until,
            *fifo_args,
        )
        return [
            rows.delivery_claim_from_row(row, destination) for row in sorted(found, key=lambda row: row[0])
        ]

    async def record_webhook_outcomes(self, outcomes: Sequence[DeliveryOutcome]) -> None:
        if not outcomes:
            return
        health = rows.destination_health_rows(outcomes)
        health_rows = (
            "SELECT * FROM unnest($10::text[], $11::float8[], $12::float8[], $13::text[], $14::float8[])"
        )
        await self._db.execute(
            "WITH outcome AS (SELECT * FROM unnest($1::bigint[], $2::int[], $3::float8[], $4::float8[], "
            "$5::int[], $6::text[], $7::text[], $8::float8[], $9::int[]) "
            "AS o (delivery, attempt, started_at, latency, status, error, state, next_at, schedule_start)), "
            "recorded AS ("
            "INSERT INTO webhook_attempts (delivery, attempt, started_at, latency, status, error) "
            "SELECT delivery, attempt, started_at, latency, status, error FROM outcome), "
            f"health AS ({rows.DESTINATION_HEALTH_UPSERT.format(rows=health_rows)}) "
            # As on SQLite: an attempt overtaken by a replay only ends its lease.
            "UPDATE webhook_deliveries d SET "
            "state = CASE WHEN d.schedule_start = o.schedule_start THEN o.state ELSE d.state END, "
            "next_at = CASE WHEN d.schedule_start = o.schedule_start THEN o.next_at ELSE d.next_at END, "
            "lease_until = 0 FROM outcome o WHERE d.id = o.delivery AND d.attempts = o.attempt",
            [o.delivery_id for o in outcomes],
            [o.attempt for o in outcomes],
            [o.started_at for o in outcomes],
            [o.latency for o in outcomes],
            [o.status for o in outcomes],
            [o.error for o in outcomes],
            [o.state for o in outcomes],
            [o.next_at for o in outcomes],
            [o.schedule_start for o in outcomes],
            *(list(column) for column in zip(*health, strict=True)),
        )

    async def disable_failing_webhook_destinations(
        self, failing_before: dict[str, float], now: float
    ) -> list[str]:
        async with self._db.acquire() as conn, conn.transaction():
            return [
                name
                for name, cutoff in failing_before.items()
                if await conn.execute(
                    rows.DISABLE_FAILING_DESTINATION.format("$1", "$2", "$3"), now, name, cutoff
                )
                == "UPDATE 1"
            ]

    async def enable_webhook_destination(self, name: str, now: float) -> bool:
        async with self._db.acquire() as conn, conn.transaction():
            if await conn.execute(rows.ENABLE_DESTINATION.format("$1"), name) == "UPDATE 0":
                return False
            await conn.execute(rows.RESUME_DESTINATION_DELIVERIES.format("$1", "$2"), now, name)
            return True

    async def list_webhook_destinations(self) -> list[WebhookDestinationState]:
        return [
            rows.destination_state_from_row(row)
            for row in await self._db.fetch(rows.WEBHOOK_DESTINATIONS_SELECT)
        ]

    async def count_webhook_backlog(self) -> list[tuple[str, str, str, int]]:
        return [(r[0], r[1], r[2], r[3]) for r in await self._db.fetch(rows.WEBHOOK_BACKLOG_SELECT)]

    async def take_lease(self, name: str, holder: str, now: float, until: float) -> bool:
        taken = await self._db.fetchval(
            "INSERT INTO webhook_leases (name, holder, expires_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at "
            "WHERE webhook_leases.holder = excluded.holder OR webhook_leases.expires_at <= $4 RETURNING TRUE",
            name,
            holder,
            until,
            now,
        )
        return bool(taken)

    async def list_webhook_events(self, query: WebhookEventQuery) -> list[WebhookEventSummary]:
        sql, args = rows.webhook_event_select(query, lambda n: f"${n}")
        return [rows.webhook_summary_from_row(row) for row in await self._db.fetch(sql, *args)]

    async def get_webhook_event(self, source: str, event_id: str) -> WebhookEventDetail | None:
        sql, args = rows.webhook_event_select(
            WebhookEventQuery(source=source, event_id=event_id), lambda n: f"${n}"
        )
        async with self._db.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            row = await conn.fetchrow(sql, *args)
            if row is None:
                return None
            stored = await conn.fetchrow("SELECT headers, body FROM webhook_events WHERE id = $1", row[0])
            deliveries = await conn.fetch(rows.DELIVERIES_OF_EVENT.format("$1"), row[0])
            attempts = await conn.fetch(rows.ATTEMPTS_OF_EVENT.format("$1"), row[0])
        return rows.webhook_detail_from_rows(row, stored[0], stored[1], deliveries, attempts)

    async def replay_webhook_events(self, query: WebhookEventQuery, now: float) -> int:
        sql, args = rows.webhook_event_select(query, lambda n: f"${n + 1}")
        # A data-modifying CTE runs whether or not the outer query reads it.
        return int(
            await self._db.fetchval(
                f"WITH matching AS (SELECT id FROM ({sql}) AS found), "
                "replayed AS (UPDATE webhook_deliveries SET state = 'pending', next_at = $1, "
                "schedule_start = attempts "
                "WHERE event IN (SELECT id FROM matching)) "
                "SELECT count(*) FROM matching",
                now,
                *args,
            )
        )

    async def purge_webhook_events(self, received_before: float, source: str | None = None) -> int:
        deleted = await self._db.fetch(
            "DELETE FROM webhook_events e WHERE e.received_at < $1 AND ($2::text IS NULL OR e.source = $2) "
            "AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d "
            "WHERE d.event = e.id AND d.state = 'pending') "
            "RETURNING e.id",
            received_before,
            source,
        )
        return len(deleted)

    # -- quota usage ----------------------------------------------------------------------------------
    @staticmethod
    async def _next_quota_version(conn: asyncpg.Connection) -> int:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", QUOTA_LOCK_KEY)
        return int(await conn.fetchval("SELECT nextval('quota_usage_version')"))

    async def sync_quota_usage(
        self, added: Sequence[QuotaUsage], since: int, now: float
    ) -> tuple[int, list[QuotaUsage]]:
        changed = rows.QUOTA_USAGE_CHANGED.format("$1")
        if not added:  # one statement, one snapshot: a version seen means every lower one committed
            return rows.quota_changes(await self._db.fetch(changed, since), since)
        async with self._db.acquire() as conn, conn.transaction():
            version = await self._next_quota_version(conn)
            add = rows.QUOTA_USAGE_ADD.format(*(f"${n}" for n in range(1, 8)))
            await conn.executemany(add, [rows.quota_usage_to_row(usage, version) for usage in added])
            await conn.execute(rows.QUOTA_USAGE_EXPIRED.format("$1"), now)
            return rows.quota_changes(await conn.fetch(changed, since), since)

    async def list_quota_usage(
        self, route: str | None = None, key: str | None = None, now: float = 0.0
    ) -> list[QuotaUsage]:
        sql, args = rows.quota_usage_select(route, key, now, lambda n: f"${n}")
        return [rows.quota_usage_from_row(row) for row in await self._db.fetch(sql, *args)]

    async def reset_quota_usage(self, route: str, quota: str, period: str, key: str | None = None) -> int:
        sql, args = rows.quota_usage_reset(route, quota, period, key, lambda n: f"${n}")
        async with self._db.acquire() as conn, conn.transaction():
            status = await conn.execute(sql, await self._next_quota_version(conn), *args)
        return int(status.split()[-1])

    # -- usage analytics ----------------------------------------------------------------------------
    async def add_usage(self, buckets: Sequence[UsageBucket]) -> None:
        if not buckets:
            return
        add = rows.usage_add("GREATEST", [f"${n}" for n in range(1, 14)])
        # Rows in key order: two writers lock the rows they share in the same order.
        table = sorted(rows.usage_bucket_to_row(bucket) for bucket in buckets)
        async with self._db.acquire() as conn, conn.transaction():
            # Shared with other writers, not with a rollup: a rollup deleting rows in its own order
            # while a writer adds to them could deadlock with it.
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", USAGE_ROLLUP_LOCK_KEY)
            await conn.executemany(add, table)

    async def query_usage(self, query: UsageQuery) -> list[UsageRow]:
        sql, args = rows.usage_select(query, "GREATEST", lambda n: f"${n}")
        return rows.usage_rows(await self._db.fetch(sql, *args), query)

    async def rollup_usage(self, cutoffs: RollupCutoffs) -> RollupResult:
        async def move(conn: asyncpg.Connection, source: int, into: int, before: int) -> int:
            # What is added up is exactly what this statement deleted; a minute written after the
            # rollup commits is a new row, moved by the next one.
            return int(
                await conn.fetchval(
                    "WITH moved AS (DELETE FROM usage_buckets "
                    f"WHERE granularity = {source} AND bucket_start < $1 RETURNING *), "
                    f"added AS ({rows.usage_rollup('GREATEST', into, 'moved')}) "
                    "SELECT count(*) FROM moved",
                    before,
                )
            )

        async with self._db.acquire() as conn, conn.transaction():
            # Rollups take turns, and writers wait for them (they would otherwise lock the same rows
            # in different orders).
            await conn.execute("SELECT pg_advisory_xact_lock($1)", USAGE_ROLLUP_LOCK_KEY)
            minutes, hours = [await move(conn, *step) for step in rows.usage_rollup_moves(cutoffs)]
            deleted = await conn.execute(rows.USAGE_EXPIRED.format("$1"), cutoffs.delete_before)
            return RollupResult(minutes, hours, int(deleted.split()[-1]))
