"""The store, one suite over both backends: SQLite on a temp file, PostgreSQL on a fresh database.

PostgreSQL must answer on 127.0.0.1:5432 with trust auth (as on CI); if it does not, the
PostgreSQL cases fail rather than skip. Tests are sync functions driving one event loop per test
(``run``), so no asyncio plugin is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from apigate.store import ApiKey, Consumer, Store, open_store
from apigate.store.migrations import MIGRATIONS
from apigate.store.postgres import PostgresStore
from apigate.store.roles.credentials import Credential
from apigate.store.roles.tokens import RevokedToken
from apigate.store.sqlite import SqliteStore
from tests.support.pg import fresh_database

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]

LATEST_VERSIONS = [version for version, _, _ in MIGRATIONS]


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def run() -> Iterator[Run]:
    """Run a coroutine on this test's event loop (one loop for the fixtures and the test body,
    since an asyncpg pool belongs to the loop that made it)."""
    with asyncio.Runner() as runner:
        yield runner.run


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path, run: Run) -> Iterator[str]:
    """A URL of an empty database (not yet migrated) for each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    with fresh_database() as url:
        yield url


@pytest.fixture
def store(store_url: str, run: Run) -> Iterator[Store]:
    """An opened store on the fresh database."""
    opened_store = open_store(store_url)
    run(opened_store.open())
    yield opened_store
    run(opened_store.close())


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[Store]:
    """Another Store object on the same database."""
    other = open_store(url)
    await other.open()
    try:
        yield other
    finally:
        await other.close()


async def schema_versions(url: str) -> list[int]:
    """schema_version as the database holds it, read without the store."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            return [row[0] for row in conn.execute("SELECT version FROM schema_version ORDER BY version")]
        finally:
            conn.close()
    pg = await asyncpg.connect(url)
    try:
        return [row[0] for row in await pg.fetch("SELECT version FROM schema_version ORDER BY version")]
    finally:
        await pg.close()


def consumer(consumer_id: str, tenant: str | None = "acme", **fields: Any) -> Consumer:
    return Consumer(id=consumer_id, tenant=tenant, created_at=1_700_000_000.25, **fields)


def key(key_id: str, consumer_id: str, **fields: Any) -> ApiKey:
    return ApiKey(
        id=key_id,
        consumer_id=consumer_id,
        hash=fields.pop("hash", f"hash-{key_id}"),
        prefix=f"ak_{key_id[:4]}",
        created_at=1_700_000_100.5,
        **fields,
    )


# -- open_store ---------------------------------------------------------------------------------


def test_open_store_chooses_backend_by_scheme(tmp_path: Path) -> None:
    relative = open_store("sqlite:///data/apigate.db")
    assert isinstance(relative, SqliteStore)
    assert relative.path == Path("data/apigate.db")
    absolute = open_store(f"sqlite:///{tmp_path}/apigate.db")
    assert isinstance(absolute, SqliteStore)
    assert absolute.path == tmp_path / "apigate.db"
    assert isinstance(open_store("postgresql://u@db:5432/gw"), PostgresStore)
    assert isinstance(open_store("postgres://u@db:5432/gw"), PostgresStore)
    with pytest.raises(ValueError, match="accepted forms") as caught:
        open_store("mysql://user:secret@db/gw")
    assert "secret" not in str(caught.value)  # a URL's password never lands in a log line
    with pytest.raises(ValueError, match="accepted forms"):
        open_store("sqlite://relative.db")


# -- migrations -----------------------------------------------------------------------------------


def test_migrations_applied_once_and_reopen_is_idempotent(store: Store, store_url: str, run: Run) -> None:
    async def body() -> None:
        assert await schema_versions(store_url) == LATEST_VERSIONS
        await store.upsert_consumer(consumer("c1"))
        for _ in range(2):
            async with opened(store_url) as again:
                assert await again.get_consumer("c1") == consumer("c1")
        assert await schema_versions(store_url) == LATEST_VERSIONS

    run(body())


def test_a_step_missing_below_a_recorded_one_still_runs(store: Store, store_url: str, run: Run) -> None:
    """Steps developed side by side can be recorded out of order; none is skipped for that."""

    async def body() -> None:
        drop = ["DELETE FROM schema_version WHERE version = 2", "DROP TABLE revoked_tokens"]
        if store_url.startswith("sqlite:///"):
            conn = sqlite3.connect(store_url.removeprefix("sqlite:///"))
            for statement in drop:
                conn.execute(statement)
            conn.commit()
            conn.close()
        else:
            pg = await asyncpg.connect(store_url)
            for statement in drop:
                await pg.execute(statement)
            await pg.close()
        assert 2 not in await schema_versions(store_url)
        async with opened(store_url) as again:
            assert await again.list_revoked_tokens() == []
        assert await schema_versions(store_url) == LATEST_VERSIONS

    run(body())


def test_concurrent_first_opens_migrate_once(store_url: str, run: Run) -> None:
    """Several nodes (or processes) starting at once on an empty database."""

    async def body() -> None:
        stores = [open_store(store_url) for _ in range(4)]
        await asyncio.gather(*(each.open() for each in stores))
        try:
            assert await schema_versions(store_url) == LATEST_VERSIONS
            await stores[0].upsert_consumer(consumer("c1"))
            assert await stores[3].get_consumer("c1") == consumer("c1")
        finally:
            await asyncio.gather(*(each.close() for each in stores))

    run(body())


def test_many_first_opens_of_new_sqlite_files_all_succeed(tmp_path: Path, run: Run) -> None:
    """Workers starting together on a new SQLite file race to switch it to WAL; the loser is
    told "database is locked" at once, not after busy_timeout, and must try again."""

    async def body(url: str) -> None:
        stores = [open_store(url) for _ in range(8)]
        opened = await asyncio.gather(*(each.open() for each in stores), return_exceptions=True)
        try:
            assert [result for result in opened if result is not None] == []
        finally:
            await asyncio.gather(*(each.close() for each in stores))

    for attempt in range(15):  # the race is lost only now and then: try it on many new files
        run(body(f"sqlite:///{tmp_path / f'new-{attempt}.db'}"))


# -- consumers and keys ---------------------------------------------------------------------------


def test_consumer_crud_and_list_by_tenant(store: Store, run: Run) -> None:
    async def body() -> None:
        assert await store.get_consumer("alice") is None
        assert await store.list_consumers() == []
        alice = consumer("alice", groups=("admins",))
        bob = consumer("bob", tenant="globex")
        carol = consumer("carol", tenant=None)
        for each in (bob, alice, carol):
            await store.upsert_consumer(each)
        assert await store.get_consumer("alice") == alice
        assert await store.list_consumers() == [alice, bob, carol]
        assert await store.list_consumers("acme") == [alice]
        assert await store.list_consumers("globex") == [bob]
        assert await store.list_consumers("nobody") == []

        changed = consumer("alice", tenant="globex", groups=(), metadata={"tier": "gold"}, disabled=True)
        await store.upsert_consumer(changed)
        assert await store.get_consumer("alice") == changed
        assert await store.list_consumers("acme") == []
        assert await store.list_consumers("globex") == [changed, bob]

        assert await store.delete_consumer("bob") is True
        assert await store.delete_consumer("bob") is False
        assert await store.get_consumer("bob") is None
        assert await store.list_consumers() == [changed, carol]

    run(body())


def test_keys_add_get_list_update(store: Store, run: Run) -> None:
    async def body() -> None:
        await store.upsert_consumer(consumer("alice"))
        await store.upsert_consumer(consumer("bob"))
        k1 = key("k1", "alice", scopes=("read",))
        k2 = key("k2", "alice", rotated_from="k1")
        k3 = key("k3", "bob")
        for each in (k3, k2, k1):
            await store.add_key(each)
        assert await store.get_key("k1") == k1
        assert await store.get_key("missing") is None
        assert await store.list_keys("alice") == [k1, k2]
        assert await store.list_keys("bob") == [k3]
        assert await store.list_keys("nobody") == []
        assert await store.list_keys() == [k1, k2, k3]

        revoked = ApiKey(
            id="k1",
            consumer_id="alice",
            hash="hash-k1",
            prefix="ak_k1",
            scopes=("read", "write"),
            allowed_cidrs=("10.0.0.0/8",),
            time_windows=("mon-fri 08:00-18:00",),
            expires_at=1_800_000_000.0,
            revoked_at=1_700_000_500.75,
            created_at=1_700_000_100.5,
        )
        await store.update_key(revoked)
        assert await store.get_key("k1") == revoked
        assert await store.get_key("k2") == k2

        # Only the mutable fields change; identity fields stay as created.
        await store.update_key(ApiKey(id="k2", consumer_id="bob", hash="other", prefix="zz", created_at=9.0))
        assert await store.get_key("k2") == k2
        with pytest.raises(KeyError):
            await store.update_key(key("missing", "alice"))

    run(body())


def test_duplicate_key_hash_is_a_value_error(store: Store, run: Run) -> None:
    async def body() -> None:
        await store.upsert_consumer(consumer("alice"))
        await store.add_key(key("k1", "alice", hash="same"))
        version = await store.change_version()
        with pytest.raises(ValueError) as caught:
            await store.add_key(key("k2", "alice", hash="same"))
        assert str(caught.value) == "an API key with this hash already exists"
        assert await store.get_key("k2") is None
        assert await store.change_version() == version  # the failed write left no change row

        # Other database errors propagate as they are.
        with pytest.raises((sqlite3.IntegrityError, asyncpg.UniqueViolationError)):
            await store.add_key(key("k1", "alice", hash="different"))
        with pytest.raises((sqlite3.IntegrityError, asyncpg.ForeignKeyViolationError)):
            await store.add_key(key("k3", "nobody"))
        assert await store.change_version() == version

    run(body())


def test_delete_consumer_cascades_to_keys(store: Store, run: Run) -> None:
    async def body() -> None:
        await store.upsert_consumer(consumer("alice"))
        await store.upsert_consumer(consumer("bob"))
        await store.add_key(key("k1", "alice"))
        await store.add_key(key("k2", "alice"))
        await store.add_key(key("k3", "bob"))
        assert await store.delete_consumer("alice") is True
        assert await store.get_key("k1") is None
        assert await store.list_keys("alice") == []
        assert await store.list_keys() == [key("k3", "bob")]
        # The hash is free again once its key is gone.
        await store.upsert_consumer(consumer("alice"))
        await store.add_key(key("k4", "alice", hash="hash-k1"))

    run(body())


# -- credentials (client secrets and login passwords) ------------------------------------------------


def test_credentials_set_replace_list_and_delete(store: Store, run: Run) -> None:
    async def body() -> None:
        await store.upsert_consumer(consumer("alice"))
        await store.upsert_consumer(consumer("bob"))
        secret = Credential("alice", "secret", "scrypt$hash-1", scopes=("a:read", "b"), created_at=1.5)
        login = Credential("alice", "password", "scrypt$hash-2", username="alice@example.com", created_at=2.0)
        before = await store.change_version()
        await store.set_credential(secret)
        await store.set_credential(login)
        assert await store.change_version() > before
        assert await store.list_credentials() == [login, secret]  # by id: password:..., secret:...
        assert await store.list_credentials("bob") == []
        # Setting one again replaces it (one secret per consumer, one password per username).
        newer = Credential("alice", "secret", "scrypt$hash-3", created_at=3.0)
        await store.set_credential(newer)
        assert await store.list_credentials("alice") == [login, newer]
        assert newer.id == "secret:alice" and login.id == "password:alice@example.com"
        assert await store.delete_credential(login.id) is True
        assert await store.delete_credential(login.id) is False
        assert await store.list_credentials() == [newer]

    run(body())


def test_a_username_belongs_to_one_consumer(store: Store, run: Run) -> None:
    async def body() -> None:
        await store.upsert_consumer(consumer("alice"))
        await store.upsert_consumer(consumer("bob"))
        await store.set_credential(Credential("alice", "password", "scrypt$a", username="shared"))
        version = await store.change_version()
        with pytest.raises(ValueError, match="another consumer"):
            await store.set_credential(Credential("bob", "password", "scrypt$b", username="shared"))
        assert await store.change_version() == version
        assert [c.consumer_id for c in await store.list_credentials()] == ["alice"]
        with pytest.raises((sqlite3.IntegrityError, asyncpg.ForeignKeyViolationError)):
            await store.set_credential(Credential("nobody", "secret", "scrypt$c"))

    run(body())


def test_delete_consumer_cascades_to_credentials(store: Store, run: Run) -> None:
    async def body() -> None:
        await store.upsert_consumer(consumer("alice"))
        await store.set_credential(Credential("alice", "secret", "scrypt$a"))
        await store.set_credential(Credential("alice", "password", "scrypt$b", username="al"))
        assert await store.delete_consumer("alice") is True
        assert await store.list_credentials() == []
        # The username is free again.
        await store.upsert_consumer(consumer("bob"))
        await store.set_credential(Credential("bob", "password", "scrypt$c", username="al"))

    run(body())


# -- revoked tokens (jti denylist) ----------------------------------------------------------------


def test_revoked_tokens_round_trip_and_every_revocation_is_a_change(
    store: Store, store_url: str, run: Run
) -> None:
    async def scenario() -> None:
        assert await store.list_revoked_tokens() == []
        before = await store.change_version()
        await store.revoke_token(RevokedToken("jti-b", expires_at=2000.5, reason="leaked", created_at=10.0))
        await store.revoke_token(RevokedToken("jti-a", created_at=11.0))
        assert await store.change_version() > before
        assert await store.list_revoked_tokens() == [
            RevokedToken("jti-a", expires_at=None, reason=None, created_at=11.0),
            RevokedToken("jti-b", expires_at=2000.5, reason="leaked", created_at=10.0),
        ]
        # Revoking again: a new end and reason; the first revocation's time stays.
        middle = await store.change_version()
        await store.revoke_token(RevokedToken("jti-b", expires_at=3000.0, reason="stolen", created_at=99.0))
        assert await store.change_version() > middle
        async with opened(store_url) as other:
            assert await other.list_revoked_tokens() == [
                RevokedToken("jti-a", created_at=11.0),
                RevokedToken("jti-b", expires_at=3000.0, reason="stolen", created_at=10.0),
            ]

    run(scenario())


def test_purge_revoked_tokens_deletes_only_expired_ones_and_records_no_change(store: Store, run: Run) -> None:
    async def scenario() -> None:
        for jti, expires_at in (("old", 100.0), ("edge", 150.0), ("later", 200.0), ("forever", None)):
            await store.revoke_token(RevokedToken(jti, expires_at=expires_at, created_at=1.0))
        version = await store.change_version()
        assert await store.purge_revoked_tokens(150.0) == 1
        assert await store.purge_revoked_tokens(150.0) == 0
        assert [t.jti for t in await store.list_revoked_tokens()] == ["edge", "forever", "later"]
        assert await store.change_version() == version

    run(scenario())


# -- change feed and settings ---------------------------------------------------------------------


def test_change_version_grows_on_every_write_and_not_on_reads(store: Store, run: Run) -> None:
    async def body() -> None:
        assert await store.change_version() == 0
        writes: list[Callable[[], Coroutine[Any, Any, Any]]] = [
            lambda: store.upsert_consumer(consumer("alice")),
            lambda: store.upsert_consumer(consumer("alice", disabled=True)),
            lambda: store.add_key(key("k1", "alice")),
            lambda: store.update_key(key("k1", "alice", revoked_at=1.0)),
            lambda: store.set_setting("a", "1"),
            lambda: store.set_setting("a", "2"),
            lambda: store.set_setting("b", "1", only_if_absent=True),
            lambda: store.delete_consumer("alice"),
        ]
        reads: list[Callable[[], Coroutine[Any, Any, Any]]] = [
            lambda: store.get_consumer("alice"),
            lambda: store.list_consumers(),
            lambda: store.list_consumers("acme"),
            lambda: store.get_key("k1"),
            lambda: store.list_keys(),
            lambda: store.list_keys("alice"),
            lambda: store.get_setting("a"),
            lambda: store.change_version(),
            # No-ops are not writes either.
            lambda: store.set_setting("fixed", "other", only_if_absent=True),
            lambda: store.delete_consumer("nobody"),
        ]
        await store.set_setting("fixed", "1")
        version = await store.change_version()
        for write in writes:
            await write()
            after = await store.change_version()
            assert after > version
            version = after
            for read in reads:
                await read()
            assert await store.change_version() == version

    run(body())


def test_set_setting_only_if_absent_first_writer_wins(store: Store, store_url: str, run: Run) -> None:
    async def body() -> None:
        assert await store.get_setting("secret") is None
        assert await store.set_setting("secret", "first", only_if_absent=True) == "first"
        assert await store.set_setting("secret", "second", only_if_absent=True) == "first"
        assert await store.get_setting("secret") == "first"
        assert await store.set_setting("secret", "forced") == "forced"
        assert await store.get_setting("secret") == "forced"

        # Racing first writers on two Store objects (two nodes) all get the one stored value.
        async with opened(store_url) as other:
            results = await asyncio.gather(
                *(
                    (store if n % 2 else other).set_setting("race", f"v{n}", only_if_absent=True)
                    for n in range(20)
                )
            )
        assert len(set(results)) == 1
        assert await store.get_setting("race") == results[0]

    run(body())


# -- values, durability, sharing, concurrency -------------------------------------------------------


def test_values_round_trip_exactly(store: Store, run: Run) -> None:
    async def body() -> None:
        rich = Consumer(
            id="c/ü 1",
            tenant="",
            groups=("admins", "ops", "ünïcode"),
            metadata={
                "plan": {"tier": "gold", "limits": [1, 2.5, None, True, "x"], "empty": {}},
                "nested": [{"a": [[]]}, {"b": {"c": -0.1}}],
                "big": 2**53 + 1,
                "float": 0.1,
                "text": 'quote " and \\ and \n',
            },
            disabled=True,
            created_at=1_700_000_000.123456,
        )
        plain = Consumer(id="plain")  # all defaults: tenant None, () groups, {} metadata, 0.0
        await store.upsert_consumer(rich)
        await store.upsert_consumer(plain)
        assert await store.get_consumer(rich.id) == rich
        assert await store.get_consumer(plain.id) == plain
        assert await store.list_consumers("") == [rich]  # "" is a tenant; None is not

        zero_not_none = ApiKey(
            id="k-zero",
            consumer_id=rich.id,
            hash="h1",
            prefix="ak_0",
            scopes=("read:all",),
            allowed_cidrs=("10.0.0.0/8", "2001:db8::/32"),
            time_windows=("mon-fri 08:00-18:00", "sat 10:00-12:00"),
            expires_at=0.0,
            revoked_at=None,
            created_at=1234.5678901234567,
            rotated_from="k-old",
        )
        none_not_zero = ApiKey(
            id="k-none", consumer_id=rich.id, hash="h2", prefix="ak_1", expires_at=None, revoked_at=0.0
        )
        for each in (zero_not_none, none_not_zero):
            await store.add_key(each)
            got = await store.get_key(each.id)
            assert got == each
            assert got is not None
            assert (got.expires_at is None, got.revoked_at is None) == (
                each.expires_at is None,
                each.revoked_at is None,
            )
            assert type(got.scopes) is tuple
            assert type(got.time_windows) is tuple
        stored = await store.get_consumer(rich.id)
        assert stored is not None
        assert type(stored.groups) is tuple
        assert type(stored.disabled) is bool
        assert type(stored.metadata["big"]) is int

    run(body())


def test_data_survives_close_and_reopen(store_url: str, run: Run) -> None:
    async def body() -> None:
        async with opened(store_url) as first:
            await first.upsert_consumer(consumer("alice"))
            await first.add_key(key("k1", "alice"))
            await first.set_setting("key_hash_secret", "s3cr3t", only_if_absent=True)
            version = await first.change_version()
        async with opened(store_url) as second:
            assert await second.get_consumer("alice") == consumer("alice")
            assert await second.list_keys("alice") == [key("k1", "alice")]
            assert await second.get_setting("key_hash_secret") == "s3cr3t"
            assert await second.change_version() == version
            await second.upsert_consumer(consumer("bob"))
            assert await second.change_version() > version

    run(body())


def test_two_stores_see_each_others_writes(store: Store, store_url: str, run: Run) -> None:
    async def body() -> None:
        async with opened(store_url) as other:
            before = await other.change_version()
            await store.upsert_consumer(consumer("alice"))
            seen = await other.change_version()
            assert seen > before
            assert await other.get_consumer("alice") == consumer("alice")

            await other.add_key(key("k1", "alice"))
            assert await store.change_version() > seen
            assert await store.get_key("k1") == key("k1", "alice")
            assert await store.change_version() == await other.change_version()

    run(body())


def test_concurrent_upserts_all_land(store: Store, store_url: str, run: Run) -> None:
    async def body() -> None:
        before = await store.change_version()
        await asyncio.gather(*(store.upsert_consumer(consumer(f"c{n:02}")) for n in range(50)))
        assert [c.id for c in await store.list_consumers()] == [f"c{n:02}" for n in range(50)]
        assert await store.change_version() == before + 50

        # Two Store objects (two processes' worth of connections) writing at once.
        async with opened(store_url) as other:
            await asyncio.gather(
                *(
                    (store if n % 2 else other).upsert_consumer(consumer(f"d{n:02}", tenant="two"))
                    for n in range(50)
                )
            )
            assert len(await other.list_consumers("two")) == 50
        assert len(await store.list_consumers()) == 100

    run(body())


def test_sqlite_never_blocks_the_event_loop(tmp_path: Path, run: Run) -> None:
    """A write waits for another connection's write lock in the worker thread, not on the loop.

    A blocker holds the file's write lock, and only code on the event loop releases it. Were the
    write to block the loop, nothing could release the lock: the write would fail after the busy
    timeout and the ticks would stall. Instead the loop keeps ticking and the write then lands.
    """

    async def body() -> None:
        url = f"sqlite:///{tmp_path / 'store.db'}"
        async with opened(url) as store:
            blocker = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
            try:
                blocker.execute("BEGIN IMMEDIATE")
                ticks = 0
                loop = asyncio.get_running_loop()

                handle: asyncio.Handle = loop.call_soon(lambda: None)

                def tick() -> None:
                    nonlocal ticks, handle
                    ticks += 1
                    handle = loop.call_later(0.01, tick)

                handle = loop.call_soon(tick)
                write = asyncio.ensure_future(store.upsert_consumer(consumer("alice")))
                while ticks < 10:
                    await asyncio.sleep(0.01)
                assert not write.done(), "the write finished while another connection held the lock"
                blocker.execute("ROLLBACK")
                await asyncio.wait_for(write, timeout=10)
            finally:
                handle.cancel()
                blocker.close()
            assert await store.get_consumer("alice") == consumer("alice")

    run(body())


def test_sqlite_connection_settings(tmp_path: Path, run: Run) -> None:
    """WAL, fsync on every commit, a busy timeout for sibling processes, enforced foreign keys."""

    async def body() -> None:
        store = SqliteStore(tmp_path / "store.db")
        await store.open()
        try:
            pragmas = await store._run(
                lambda conn: {
                    name: conn.execute(f"PRAGMA {name}").fetchone()[0]
                    for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
                }
            )
        finally:
            await store.close()
        assert pragmas == {"journal_mode": "wal", "synchronous": 2, "busy_timeout": 5000, "foreign_keys": 1}

    run(body())
