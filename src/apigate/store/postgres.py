"""The PostgreSQL store: asyncpg with a connection pool, for gateways on several machines."""

from __future__ import annotations

import time

import asyncpg

from apigate.store.base import ApiKey, Consumer, Store
from apigate.store.migrations import (
    CONSUMER_COLUMNS,
    DUPLICATE_HASH_MESSAGE,
    KEY_COLUMNS,
    consumer_from_row,
    consumer_to_row,
    key_from_row,
    key_to_row,
    migrate_postgres,
)

# Serialises the final step of every write (take a change id, commit). Without it a bigserial id
# can become visible after a higher one: a reader would see max(id) move past a change it cannot
# see yet, and never reload for it. Held from nextval to commit, ids commit in order.
CHANGES_LOCK_KEY = 0x61706967_63686E67  # "apigchng"

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

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # -- consumers ----------------------------------------------------------------------------
    async def upsert_consumer(self, consumer: Consumer) -> None:
        async with self._db.acquire() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO consumers ({CONSUMER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6) "
                "ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, groups = excluded.groups, "
                "metadata = excluded.metadata, disabled = excluded.disabled, "
                "created_at = excluded.created_at",
                *consumer_to_row(consumer),
            )
            await self._record_change(conn, "consumer", consumer.id)

    async def get_consumer(self, consumer_id: str) -> Consumer | None:
        row = await self._db.fetchrow(f"SELECT {CONSUMER_COLUMNS} FROM consumers WHERE id = $1", consumer_id)
        return None if row is None else consumer_from_row(row)

    async def list_consumers(self, tenant: str | None = None) -> list[Consumer]:
        if tenant is None:
            rows = await self._db.fetch(f"SELECT {CONSUMER_COLUMNS} FROM consumers ORDER BY id")
        else:
            rows = await self._db.fetch(
                f"SELECT {CONSUMER_COLUMNS} FROM consumers WHERE tenant = $1 ORDER BY id", tenant
            )
        return [consumer_from_row(row) for row in rows]

    async def delete_consumer(self, consumer_id: str) -> bool:
        async with self._db.acquire() as conn, conn.transaction():
            deleted = await conn.fetchval("DELETE FROM consumers WHERE id = $1 RETURNING TRUE", consumer_id)
            if deleted:  # its keys go by ON DELETE CASCADE
                await self._record_change(conn, "consumer", consumer_id)
            return bool(deleted)

    # -- API keys -------------------------------------------------------------------------------
    async def add_key(self, key: ApiKey) -> None:
        row = key_to_row(key)
        try:
            async with self._db.acquire() as conn, conn.transaction():
                await conn.execute(
                    f"INSERT INTO api_keys ({KEY_COLUMNS}) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                    *row,
                )
                await self._record_change(conn, "api_key", key.id)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "api_keys_hash_unique":
                raise ValueError(DUPLICATE_HASH_MESSAGE) from exc
            raise

    async def update_key(self, key: ApiKey) -> None:
        """Replace scopes, allowed_cidrs, time_windows, expires_at and revoked_at.

        id, consumer_id, hash, prefix, created_at and rotated_from are fixed at creation and
        ignored here. Raises KeyError if no key has this id.
        """
        row = key_to_row(key)
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
        row = await self._db.fetchrow(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1", key_id)
        return None if row is None else key_from_row(row)

    async def list_keys(self, consumer_id: str | None = None) -> list[ApiKey]:
        if consumer_id is None:
            rows = await self._db.fetch(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id")
        else:
            rows = await self._db.fetch(
                f"SELECT {KEY_COLUMNS} FROM api_keys WHERE consumer_id = $1 ORDER BY id", consumer_id
            )
        return [key_from_row(row) for row in rows]

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
