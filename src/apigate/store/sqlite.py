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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from apigate.store import rows
from apigate.store.base import Store
from apigate.store.groupcommit import GroupCommit
from apigate.store.migrations import migrate_sqlite
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

T = TypeVar("T")

# Several gateway processes on one machine share the file: wait this long for the write lock.
BUSY_TIMEOUT_MS = 5000


class SqliteStore(Store):
    """A Store on a SQLite file (created if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._webhook_writes: GroupCommit[Callable[[sqlite3.Connection], Any], Any] = GroupCommit(
            self._commit_webhook_writes
        )

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

    async def _select_rows(self, columns: str, table: str, column: str, value: str | None) -> list[Any]:
        sql, args = rows.select_rows(columns, table, column, value, "?")
        return await self._run(lambda conn: conn.execute(sql, args).fetchall())

    @staticmethod
    def _record_change(conn: sqlite3.Connection, entity: str, entity_id: str) -> None:
        conn.execute(
            "INSERT INTO changes (entity, entity_id, at) VALUES (?, ?, ?)", (entity, entity_id, time.time())
        )

    @staticmethod
    def _enable_wal(conn: sqlite3.Connection) -> str:
        """Switch to WAL; the journal mode it reports. Several processes opening a new file at
        once race for the switch, and SQLite answers the loser "database is locked" at once,
        without waiting in busy_timeout: retry until that timeout has passed."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(0.005)

    def _connect(self) -> sqlite3.Connection:
        # Runs in the worker thread; isolation_level=None: transactions are explicit, never implicit.
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = self._enable_wal(conn)
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
        await self._webhook_writes.close()
        executor, conn = self._executor, self._conn
        if executor is None or conn is None:
            return
        self._executor = self._conn = None
        try:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        finally:
            # The close job has finished, so the thread is idle: no need to join it from the loop.
            executor.shutdown(wait=False)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    # -- consumers ----------------------------------------------------------------------------
    async def upsert_consumer(self, consumer: Consumer) -> None:
        row = rows.consumer_to_row(consumer)

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO consumers ({rows.CONSUMER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
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
                f"SELECT {rows.CONSUMER_COLUMNS} FROM consumers WHERE id = ?", (consumer_id,)
            ).fetchone()
            return None if row is None else rows.consumer_from_row(row)

        return await self._run(job)

    async def list_consumers(self, tenant: str | None = None) -> list[Consumer]:
        found = await self._select_rows(rows.CONSUMER_COLUMNS, "consumers", "tenant", tenant)
        return [rows.consumer_from_row(row) for row in found]

    async def delete_consumer(self, consumer_id: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            deleted = conn.execute("DELETE FROM consumers WHERE id = ?", (consumer_id,)).rowcount > 0
            if deleted:  # its keys go by ON DELETE CASCADE
                self._record_change(conn, "consumer", consumer_id)
            return deleted

        return await self._write(job)

    # -- API keys -------------------------------------------------------------------------------
    async def add_key(self, key: ApiKey) -> None:
        row = rows.key_to_row(key)

        def job(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    f"INSERT INTO api_keys ({rows.KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row
                )
            except sqlite3.IntegrityError as exc:
                # SQLite names the failing columns in the message; only the hash maps to ValueError.
                if "UNIQUE constraint failed: api_keys.hash" in str(exc):
                    raise ValueError(rows.DUPLICATE_HASH_MESSAGE) from exc
                raise
            self._record_change(conn, "api_key", key.id)

        await self._write(job)

    async def update_key(self, key: ApiKey) -> None:
        """Replace scopes, allowed_cidrs, time_windows, expires_at and revoked_at.

        id, consumer_id, hash, prefix, created_at and rotated_from are fixed at creation and
        ignored here. Raises KeyError if no key has this id.
        """
        row = rows.key_to_row(key)

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
            row = conn.execute(f"SELECT {rows.KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            return None if row is None else rows.key_from_row(row)

        return await self._run(job)

    async def list_keys(self, consumer_id: str | None = None) -> list[ApiKey]:
        found = await self._select_rows(rows.KEY_COLUMNS, "api_keys", "consumer_id", consumer_id)
        return [rows.key_from_row(row) for row in found]

    # -- revoked tokens (jti denylist) ------------------------------------------------------------------
    async def revoke_token(self, token: RevokedToken) -> None:
        row = rows.revoked_token_to_row(token)

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(rows.REVOKED_TOKEN_UPSERT.format("?", "?", "?", "?"), row)
            self._record_change(conn, "revoked_token", token.jti)

        await self._write(job)

    async def list_revoked_tokens(self) -> list[RevokedToken]:
        def job(conn: sqlite3.Connection) -> list[RevokedToken]:
            found = conn.execute(
                f"SELECT {rows.REVOKED_TOKEN_COLUMNS} FROM revoked_tokens ORDER BY jti"
            ).fetchall()
            return [rows.revoked_token_from_row(row) for row in found]

        return await self._run(job)

    async def purge_revoked_tokens(self, expired_before: float) -> int:
        def job(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM revoked_tokens WHERE expires_at < ?", (expired_before,)).rowcount

        return await self._write(job)

    # -- credentials ------------------------------------------------------------------------------------
    async def set_credential(self, credential: Credential) -> None:
        row = rows.credential_to_row(credential)

        def job(conn: sqlite3.Connection) -> None:
            try:
                changed = conn.execute(rows.CREDENTIAL_UPSERT.format(*"???????"), row).rowcount
            except sqlite3.IntegrityError as exc:
                if "UNIQUE constraint failed: credentials.username" in str(exc):
                    raise ValueError(rows.USERNAME_TAKEN_MESSAGE) from exc
                raise
            if not changed:
                raise ValueError(rows.USERNAME_TAKEN_MESSAGE)
            self._record_change(conn, "credential", credential.id)

        await self._write(job)

    async def list_credentials(self, consumer_id: str | None = None) -> list[Credential]:
        found = await self._select_rows(rows.CREDENTIAL_COLUMNS, "credentials", "consumer_id", consumer_id)
        return [rows.credential_from_row(row) for row in found]

    async def delete_credential(self, credential_id: str) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            deleted = conn.execute("DELETE FROM credentials WHERE id = ?", (credential_id,)).rowcount > 0
            if deleted:
                self._record_change(conn, "credential", credential_id)
            return deleted

        return await self._write(job)

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

    # -- webhooks -----------------------------------------------------------------------------------
    # One process owns delivery on a SQLite file (a lease row), so claims need no row locking.
    # Intake groups, claims and attempt outcomes all wait for the one thread and its disk flush;
    # the writes waiting at any moment share one transaction (each in its own savepoint), so a
    # busy worker pays one flush per round of work rather than one per write.
    delivery_needs_owner = True

    async def _write_webhooks(self, job: Callable[[sqlite3.Connection], T]) -> T:
        return await self._webhook_writes.submit(job)

    async def _commit_webhook_writes(
        self, jobs: Sequence[Callable[[sqlite3.Connection], Any]]
    ) -> list[Any | Exception]:
        def run_all(conn: sqlite3.Connection) -> list[Any | Exception]:
            results: list[Any | Exception] = []
            for job in jobs:
                conn.execute("SAVEPOINT webhook_write")
                try:
                    results.append(job(conn))
                except Exception as exc:
                    conn.execute("ROLLBACK TO webhook_write")
                    results.append(exc)
                conn.execute("RELEASE webhook_write")
            return results

        return await self._write(run_all)

    async def add_webhook_events(self, events: Sequence[NewWebhookEvent]) -> list[bool]:
        def job(conn: sqlite3.Connection) -> list[bool]:
            added: list[bool] = []
            for event in events:
                cursor = conn.execute(
                    "INSERT INTO webhook_events (source, event_id, event_type, received_at, headers, body) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (source, event_id) DO NOTHING",
                    (
                        event.source,
                        event.event_id,
                        event.event_type,
                        event.received_at,
                        rows.encode_headers(event.headers),
                        event.body,
                    ),
                )
                if cursor.rowcount == 0:
                    added.append(False)
                    continue
                added.append(True)
                conn.executemany(
                    "INSERT INTO webhook_deliveries (event, destination, next_at) VALUES (?, ?, ?)",
                    [(cursor.lastrowid, name, event.first_due) for name in event.destinations],
                )
            return added

        return await self._write_webhooks(job)

    async def claim_webhook_deliveries(
        self,
        destination: str,
        limit: int,
        now: float,
        lease_until: float,
        fifo_sources: frozenset[str] = frozenset(),
    ) -> list[DeliveryClaim]:
        fifo_condition = ""
        fifo_args: tuple[str, ...] = ()
        if fifo_sources:
            # Of a FIFO source only the delivery of its oldest pending event (leased or not) is
            # claimable; the one delivering process then holds it until it is delivered or dead.
            fifo_condition = (
                "AND (e.source NOT IN (SELECT value FROM json_each(?)) OR e.id IN ("
                "SELECT min(d2.event) FROM webhook_deliveries d2 JOIN webhook_events e2 ON e2.id = d2.event "
                "WHERE d2.destination = ? AND d2.state = 'pending' "
                "AND e2.source IN (SELECT value FROM json_each(?)) GROUP BY e2.source)) "
            )
            sources = orjson.dumps(sorted(fifo_sources)).decode()
            fifo_args = (sources, destination, sources)

        def job(conn: sqlite3.Connection) -> list[DeliveryClaim]:
            # Read and update in one write transaction of the one delivering process: atomic.
            found = conn.execute(
                "SELECT d.id, d.attempts + 1, d.attempts + 1 - d.schedule_start, e.source, e.event_id, "
                "e.event_type, e.received_at, e.headers, e.body "
                "FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event "
                "WHERE d.destination = ? AND d.state = 'pending' AND d.next_at <= ? AND d.lease_until <= ? "
                f"AND NOT EXISTS ({rows.DESTINATION_DISABLED.format('?')}) {fifo_condition}"
                "ORDER BY d.next_at, d.id LIMIT ?",
                (destination, now, now, destination, *fifo_args, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE webhook_deliveries SET attempts = ?, lease_until = ? WHERE id = ?",
                [(row[1], lease_until, row[0]) for row in found],
            )
            return [rows.delivery_claim_from_row(row, destination) for row in found]

        return await self._write_webhooks(job)

    async def record_webhook_outcomes(self, outcomes: Sequence[DeliveryOutcome]) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO webhook_attempts (delivery, attempt, started_at, latency, status, error) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(o.delivery_id, o.attempt, o.started_at, o.latency, o.status, o.error) for o in outcomes],
            )
            # Only the attempt still current touches the delivery (not one whose lease ran out and
            # was claimed again); one overtaken by a replay only ends its lease, the replay's state
            # and schedule stay.
            conn.executemany(
                "UPDATE webhook_deliveries SET "
                "state = CASE WHEN schedule_start = ? THEN ? ELSE state END, "
                "next_at = CASE WHEN schedule_start = ? THEN ? ELSE next_at END, lease_until = 0 "
                "WHERE id = ? AND attempts = ?",
                [
                    (o.schedule_start, o.state, o.schedule_start, o.next_at, o.delivery_id, o.attempt)
                    for o in outcomes
                ],
            )
            conn.executemany(
                rows.DESTINATION_HEALTH_UPSERT.format(rows="VALUES (?, ?, ?, ?, ?)"),
                rows.destination_health_rows(outcomes),
            )

        await self._write_webhooks(job)

    async def disable_failing_webhook_destinations(
        self, failing_before: dict[str, float], now: float
    ) -> list[str]:
        def job(conn: sqlite3.Connection) -> list[str]:
            return [
                name
                for name, cutoff in failing_before.items()
                if conn.execute(
                    rows.DISABLE_FAILING_DESTINATION.format("?", "?", "?"), (now, name, cutoff)
                ).rowcount
            ]

        return await self._write_webhooks(job)

    async def enable_webhook_destination(self, name: str, now: float) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            if not conn.execute(rows.ENABLE_DESTINATION.format("?"), (name,)).rowcount:
                return False
            conn.execute(rows.RESUME_DESTINATION_DELIVERIES.format("?", "?"), (now, name))
            return True

        return await self._write_webhooks(job)

    async def list_webhook_destinations(self) -> list[WebhookDestinationState]:
        def job(conn: sqlite3.Connection) -> list[WebhookDestinationState]:
            return [
                rows.destination_state_from_row(row) for row in conn.execute(rows.WEBHOOK_DESTINATIONS_SELECT)
            ]

        return await self._run(job)

    async def count_webhook_backlog(self) -> list[tuple[str, str, str, int]]:
        def job(conn: sqlite3.Connection) -> list[tuple[str, str, str, int]]:
            return [(r[0], r[1], r[2], r[3]) for r in conn.execute(rows.WEBHOOK_BACKLOG_SELECT)]

        return await self._run(job)

    async def take_lease(self, name: str, holder: str, now: float, until: float) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    "INSERT INTO webhook_leases (name, holder, expires_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                    "expires_at = excluded.expires_at "
                    "WHERE webhook_leases.holder = excluded.holder OR webhook_leases.expires_at <= ?",
                    (name, holder, until, now),
                ).rowcount
                > 0
            )

        return await self._write_webhooks(job)

    async def list_webhook_events(self, query: WebhookEventQuery) -> list[WebhookEventSummary]:
        sql, args = rows.webhook_event_select(query, lambda _: "?")

        def job(conn: sqlite3.Connection) -> list[WebhookEventSummary]:
            return [rows.webhook_summary_from_row(row) for row in conn.execute(sql, args).fetchall()]

        return await self._run(job)

    async def get_webhook_event(self, source: str, event_id: str) -> WebhookEventDetail | None:
        sql, args = rows.webhook_event_select(
            WebhookEventQuery(source=source, event_id=event_id), lambda _: "?"
        )

        def job(conn: sqlite3.Connection) -> WebhookEventDetail | None:
            row = conn.execute(sql, args).fetchone()
            if row is None:
                return None
            headers, body = conn.execute(
                "SELECT headers, body FROM webhook_events WHERE id = ?", (row[0],)
            ).fetchone()
            deliveries = conn.execute(rows.DELIVERIES_OF_EVENT.format("?"), (row[0],)).fetchall()
            attempts = conn.execute(rows.ATTEMPTS_OF_EVENT.format("?"), (row[0],)).fetchall()
            return rows.webhook_detail_from_rows(row, headers, body, deliveries, attempts)

        return await self._run(job)

    async def replay_webhook_events(self, query: WebhookEventQuery, now: float) -> int:
        sql, args = rows.webhook_event_select(query, lambda _: "?")

        def job(conn: sqlite3.Connection) -> int:
            ids = [row[0] for row in conn.execute(sql, args).fetchall()]
            conn.executemany(
                "UPDATE webhook_deliveries SET state = 'pending', next_at = ?, schedule_start = attempts "
                "WHERE event = ?",
                [(now, event) for event in ids],
            )
            return len(ids)

        return await self._write_webhooks(job)

    async def purge_webhook_events(self, received_before: float, source: str | None = None) -> int:
        def job(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM webhook_events WHERE received_at < ? AND (? IS NULL OR source = ?) "
                "AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event = webhook_events.id "
                "AND d.state = 'pending')",
                (received_before, source, source),
            ).rowcount

        return await self._write_webhooks(job)

    # -- quota usage ----------------------------------------------------------------------------------
    @staticmethod
    def _next_quota_version(conn: sqlite3.Connection) -> int:
        """A new usage version (inside a write transaction: the write lock orders them)."""
        bump = "UPDATE quota_usage_version SET version = version + 1 RETURNING version"
        return int(conn.execute(bump).fetchone()[0])

    async def sync_quota_usage(
        self, added: Sequence[QuotaUsage], since: int, now: float
    ) -> tuple[int, list[QuotaUsage]]:
        def read(conn: sqlite3.Connection) -> tuple[int, list[QuotaUsage]]:
            found = conn.execute(rows.QUOTA_USAGE_CHANGED.format("?"), (since,)).fetchall()
            return rows.quota_changes(found, since)

        def write(conn: sqlite3.Connection) -> tuple[int, list[QuotaUsage]]:
            version = self._next_quota_version(conn)
            add = rows.QUOTA_USAGE_ADD.format(*"???????")
            conn.executemany(add, [rows.quota_usage_to_row(usage, version) for usage in added])
            conn.execute(rows.QUOTA_USAGE_EXPIRED.format("?"), (now,))
            return read(conn)

        if not added:  # one statement: one snapshot, and no write lock taken every second
            return await self._run(read)
        return await self._write(write)

    async def list_quota_usage(
        self, route: str | None = None, key: str | None = None, now: float = 0.0
    ) -> list[QuotaUsage]:
        sql, args = rows.quota_usage_select(route, key, now, lambda _: "?")
        return await self._run(
            lambda conn: [rows.quota_usage_from_row(row) for row in conn.execute(sql, args).fetchall()]
        )

    async def reset_quota_usage(self, route: str, quota: str, period: str, key: str | None = None) -> int:
        sql, args = rows.quota_usage_reset(route, quota, period, key, lambda _: "?")

        def job(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, [self._next_quota_version(conn), *args]).rowcount

        return await self._write(job)

    # -- usage analytics ----------------------------------------------------------------------------
    async def add_usage(self, buckets: Sequence[UsageBucket]) -> None:
        if not buckets:
            return
        add = rows.usage_add("max", "?" * 13)
        table = [rows.usage_bucket_to_row(bucket) for bucket in buckets]
        await self._write(lambda conn: conn.executemany(add, table))

    async def query_usage(self, query: UsageQuery) -> list[UsageRow]:
        sql, args = rows.usage_select(query, "max", lambda _: "?")
        return await self._run(lambda conn: rows.usage_rows(conn.execute(sql, args).fetchall(), query))

    async def rollup_usage(self, cutoffs: RollupCutoffs) -> RollupResult:
        def move(conn: sqlite3.Connection, source: int, into: int, before: int) -> int:
            # The write lock is held from the copy to the delete: no writer slips in between.
            where = f"usage_buckets WHERE granularity = {source} AND bucket_start < ?"
            conn.execute(rows.usage_rollup("max", into, where), (before,))
            return conn.execute(f"DELETE FROM {where}", (before,)).rowcount

        def job(conn: sqlite3.Connection) -> RollupResult:
            minutes, hours = (move(conn, *step) for step in rows.usage_rollup_moves(cutoffs))
            deleted = conn.execute(rows.USAGE_EXPIRED.format("?"), (cutoffs.delete_before,)).rowcount
            return RollupResult(minutes, hours, deleted)

        return await self._write(job)
