"""The SQLite store: one file in WAL mode, one connection, driven from one worker thread.

Every call runs a whole unit of work (a transaction, or one read) as a single job on a dedicated
one-thread executor, so the event loop never waits on SQLite (not even on the busy timeout while
another process holds the write lock) and the connection is only ever touched by that thread.
A cancelled caller does not interrupt a job: the transaction still commits or rolls back whole.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from apigate.store.base import ApiKey, Consumer, Store
from apigate.store.migrations import (
    CONSUMER_COLUMNS,
    DUPLICATE_HASH_MESSAGE,
    KEY_COLUMNS,
    consumer_from_row,
    consumer_to_row,
    key_from_row,
    key_to_row,
    migrate_sqlite,
)

T = TypeVar("T")

# Several gateway processes on one machine share the file: wait this long for the write lock.
BUSY_TIMEOUT_MS = 5000


class SqliteStore(Store):
    """A Store on a SQLite file (created if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    # -- plumbing -----------------------------------------------------------------------------------
    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._executor is None or self._conn is None:
            raise RuntimeError("the SQLite store is not open")
        conn = self._conn
        return await asyncio.get_running_loop().run_in_executor(self._executor, job, conn)

    async def _write(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run job in a write transaction. IMMEDIATE takes the write lock up front, so waiting for
        another process happens in busy_timeout rather than failing on a read-to-write upgrade."""

        def transaction(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = job(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await self._run(transaction)

    @staticmethod
    def _record_change(conn: sqlite3.Connection, entity: str, entity_id: str) -> None:
        conn.execute(
            "INSERT INTO changes (entity, entity_id, at) VALUES (?, ?, ?)", (entity, entity_id, time.time())
        )

    def _connect(self) -> sqlite3.Connection:
        # Runs in the worker thread; isolation_level=None: transactions are explicit, never implicit.
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"SQLite store {self.path}: could not enable WAL (journal_mode={mode})")
            # FULL: fsync the WAL on every commit; webhook events must survive power loss.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")  # per connection; needed for ON DELETE CASCADE
            migrate_sqlite(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        if self._executor is not None:
            raise RuntimeError("the SQLite store is already open")
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apigate-sqlite")
        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, self._connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        self._executor, self._conn = executor, conn

    async def close(self) -> None:
        executor, conn = self._executor, self._conn
        if executor is None or conn is None:
            return
        self._executor = self._conn = None
        try:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        finally:
            # The close job has finished, so the thread is idle: no need to join it from the loop.
            executor.shutdown(wait=False)

    # -- consumers ----------------------------------------------------------------------------
    async def upsert_consumer(self, consumer: Consumer) -> None:
        row = consumer_to_row(consumer)

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO consumers ({CONSUMER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, groups = excluded.groups, "
                "metadata = excluded.metadata, disabled = excluded.disabled, "
                "created_at = excluded.created_at",
                row,
            )
            self._record_change(conn, "consumer", consumer.id)

        await self._write(job)

    async def get_consumer(self, consumer_id: str) -> Consumer | None:
        def job(conn: sqlite3.Connection) -> Consumer | None:
            row = conn.execute(
                f"SELECT {CONSUMER_COLUMNS} FROM consumers WHERE id = ?", (consumer_id,)
            ).fetchone()
            return None if row is None else consumer_from_row(row)

        return await self._run(job)

    async def list_consumers(self, tenant: str | None = None) -> list[Consumer]:
        def job(conn: sqlite3.Connection) -> list[Consumer]:
            if tenant is None:
                rows = conn.execute(f"SELECT {CONSUMER_COLUMNS} FROM consumers ORDER BY id").fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {CONSUMER_COLUMNS} FROM consumers WHERE tenant = ? ORDER BY id", (tenant,)
                ).fetchall()
            return [consumer_from_row(row) for row in rows]

        return await self._run(job)

    async def delete_consumer(self, consumer_id: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            deleted = conn.execute("DELETE FROM consumers WHERE id = ?", (consumer_id,)).rowcount > 0
            if deleted:  # its keys go by ON DELETE CASCADE
                self._record_change(conn, "consumer", consumer_id)
            return deleted

        return await self._write(job)

    # -- API keys -------------------------------------------------------------------------------
    async def add_key(self, key: ApiKey) -> None:
        row = key_to_row(key)

        def job(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row
                )
            except sqlite3.IntegrityError as exc:
                # SQLite names the failing columns in the message; only the hash maps to ValueError.
                if "UNIQUE constraint failed: api_keys.hash" in str(exc):
                    raise ValueError(DUPLICATE_HASH_MESSAGE) from exc
                raise
            self._record_change(conn, "api_key", key.id)

        await self._write(job)

    async def update_key(self, key: ApiKey) -> None:
        """Replace scopes, allowed_cidrs, time_windows, expires_at and revoked_at.

        id, consumer_id, hash, prefix, created_at and rotated_from are fixed at creation and
        ignored here. Raises KeyError if no key has this id.
        """
        row = key_to_row(key)

        def job(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(
                "UPDATE api_keys SET scopes = ?, allowed_cidrs = ?, time_windows = ?, expires_at = ?, "
                "revoked_at = ? WHERE id = ?",
                (*row[4:9], key.id),
            )
            if cursor.rowcount == 0:
                raise KeyError(key.id)
            self._record_change(conn, "api_key", key.id)

        await self._write(job)

    async def get_key(self, key_id: str) -> ApiKey | None:
        def job(conn: sqlite3.Connection) -> ApiKey | None:
            row = conn.execute(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            return None if row is None else key_from_row(row)

        return await self._run(job)

    async def list_keys(self, consumer_id: str | None = None) -> list[ApiKey]:
        def job(conn: sqlite3.Connection) -> list[ApiKey]:
            if consumer_id is None:
                rows = conn.execute(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id").fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {KEY_COLUMNS} FROM api_keys WHERE consumer_id = ? ORDER BY id", (consumer_id,)
                ).fetchall()
            return [key_from_row(row) for row in rows]

        return await self._run(job)

    # -- change feed and settings -------------------------------------------------------------------
    async def change_version(self) -> int:
        def job(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM changes").fetchone()[0])

        return await self._run(job)

    async def get_setting(self, name: str) -> str | None:
        def job(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
            return None if row is None else row[0]

        return await self._run(job)

    async def set_setting(self, name: str, value: str, only_if_absent: bool = False) -> str:
        def job(conn: sqlite3.Connection) -> str:
            if only_if_absent:
                # The write lock (BEGIN IMMEDIATE) makes insert-then-read atomic across processes.
                inserted = conn.execute(
                    "INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                    (name, value),
                ).rowcount
            else:
                inserted = conn.execute(
                    "INSERT INTO settings (name, value) VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (name, value),
                ).rowcount
            if inserted:
                self._record_change(conn, "setting", name)
            return conn.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()[0]

        return await self._write(job)
