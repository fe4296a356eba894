"""``Store``: every role (``roles/``) of one backend, with opening and closing.

Both backends subclass it, so mypy checks each role's signatures where they are implemented; it
lives apart from ``open_store`` because the backends import it and ``open_store`` imports them.
"""

from __future__ import annotations

from typing import Protocol

from apigate.store.roles.changes import ChangeFeed
from apigate.store.roles.consumers import ConsumerStore
from apigate.store.roles.credentials import CredentialStore
from apigate.store.roles.leases import LeaseStore
from apigate.store.roles.quotas import QuotaStore
from apigate.store.roles.settings import SettingStore
from apigate.store.roles.tokens import RevokedTokenStore
from apigate.store.roles.usage import UsageStore
from apigate.store.roles.webhooks import WebhookStore


class Store(
    ChangeFeed,
    ConsumerStore,
    CredentialStore,
    RevokedTokenStore,
    SettingStore,
    WebhookStore,
    LeaseStore,
    QuotaStore,
    UsageStore,
    Protocol,
):
    """Every role of one backend; the process that opens it closes it."""

    async def open(self) -> None:
        """Connect and apply schema migrations (versioned, idempotent)."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise unless the store answers a trivial query (for /health/detailed)."""
