"""A fresh PostgreSQL database per test, for the store tests and the cluster tests.

The server is ``$APIGATE_TEST_POSTGRES`` (default postgresql://postgres@127.0.0.1:5432, trust
auth), as for the store tests. Each database gets a random name and is dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

POSTGRES_SERVER = os.environ.get("APIGATE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


async def _admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(f"{POSTGRES_SERVER}/postgres", timeout=10)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_SERVER} ({exc!r}); these tests need it "
            "(user postgres, trust auth). Start it, e.g. "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
            pytrace=False,
        )


async def _create(name: str) -> None:
    admin = await _admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')  # the name is ours (uuid hex): safe to quote
    finally:
        await admin.close()


async def _drop(name: str) -> None:
    admin = await _admin()
    try:
        # FORCE (PostgreSQL 13+) ends the database's sessions and waits for them: a backend told to
        # end by pg_terminate_backend may still be attached when a plain DROP runs.
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database; dropped (after ending its sessions) on exit."""
    name = f"apigate_test_{uuid.uuid4().hex}"
    asyncio.run(_create(name))
    try:
        yield f"{POSTGRES_SERVER}/{name}"
    finally:
        asyncio.run(_drop(name))
