"""The consumer registry: every consumer, usable API key and stored credential hash, in memory,
for the data plane.

``start()`` loads the store (and the key-hash secret), then a background task checks the
store's ``change_version`` and reloads when it moved: at once when a change notice arrives on
the state backend (writers publish one after each commit; with Redis it reaches every worker
on every node), and every ``store.poll_interval`` as the safety net (slowed to
``NOTIFIED_POLL_INTERVAL`` while a Redis subscription is live; when it is lost, or Redis stops
answering on it, the wait ends at once and polling is back to ``store.poll_interval``, since
notices may no longer arrive). Consumers and keys declared in
the config are merged in (hashed here, never written to the store). The jwt policy's revoked
``jti`` list comes along with the same reloads. A reload builds new dicts and swaps them in
one assignment each; a request sees either the old data or the new. When the store cannot be
read the last good data keeps serving.

The keys live in a ``KeyIndex`` (consumers/keyindex.py, compiled), which key-auth reads
directly on every request: a repeated key costs one dict probe, a new one an HMAC and a probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, NamedTuple, Protocol

from apigate.consumers.keyindex import KeyIndex, KeyMatch
from apigate.consumers.keys import KeyHasher, display_prefix, load_key_secret
from apigate.consumers.passwords import PasswordHash, parse_hash
from apigate.consumers.service import CHANGES_CHANNEL, REVOKED_TOKEN_GRACE, ConsumerRecords
from apigate.store.roles.changes import ChangeFeed
from apigate.store.roles.consumers import ApiKey, Consumer

if TYPE_CHECKING:
    from apigate.config.models import ConsumerConfig, GatewayConfig
    from apigate.state import StateBackend, Subscription
    from apigate.state.base import Message
    from apigate.store.roles.credentials import Credential
    from apigate.store.roles.tokens import RevokedToken

log = logging.getLogger("apigate.consumers")

# A store read slower than this counts as a failed poll (the next one tries again).
REFRESH_TIMEOUT = 10.0
# While the store keeps failing, a reminder is logged this often (the first failure at once).
FAILURE_LOG_EVERY = 60.0
# While change notices arrive over Redis, polling is only the safety net and runs this seldom.
NOTIFIED_POLL_INTERVAL = 5.0


class RegistrySource(ConsumerRecords, ChangeFeed, Protocol):
    """The consumer records, and the change feed that says when to read them again."""


class Login(NamedTuple):
    """A credential to verify a secret against, and the consumer it identifies."""

    consumer_id: str
    hash: PasswordHash
    scopes: frozenset[str]  # what tokens issued on it may carry


class ConsumerRegistry:
    def __init__(
        self, store: RegistrySource, config: GatewayConfig, state: StateBackend | None = None
    ) -> None:
        self.store = store
        self.state = state
        self.config = config
        self.poll_interval = float(config.store.poll_interval) or 0.5
        self.ready = False
        self.version: int | None = None
        self.loaded_at = 0.0  # unix time of the last successful store read
        self._hasher: KeyHasher | None = None
        self.keys = KeyIndex()  # what key-auth reads per request
        self._consumers: dict[str, Consumer] = {}
        self._stored_consumers: list[Consumer] = []
        self._stored_keys: list[ApiKey] = []
        self._stored_revoked: list[RevokedToken] = []
        self._stored_credentials: list[Credential] = []
        self._secrets: dict[str, Login] = {}  # by consumer id (the client id)
        self._logins: dict[str, Login] = {}  # by username
        self._revoked_jtis: frozenset[str] = frozenset()
        self._task: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None
        self._wake = asyncio.Event()  # set by a change notice: check the store now
        self._failing_since: float | None = None
        self._failure_logged = 0.0

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self._hasher = KeyHasher(await load_key_secret(self.store))
        self.keys.digest = self._hasher.digest
        await self.refresh()  # the version starts unknown, so this always loads
        self.ready = True
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="consumer-registry-poll")
        if self.state is not None:
            self._subscription = await self.state.subscribe(CHANGES_CHANNEL, self._notified)

    def _notified(self, _message: Message) -> None:
        # A notice, or the subscription lost or (re)made, around which notices may be missed:
        # check now, then wait as long as the subscription's state allows (current_poll_interval).
        self._wake.set()

    async def stop(self) -> None:
        self.keys.live = False
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await subscription.close()
        task, self._task = self._task, None
        if task is not None:
            # On 3.11, asyncio.wait_for can swallow a cancellation that races with its inner
            # result and the poll loop would go on: cancel until the task has really ended.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def apply_config(self, config: GatewayConfig) -> None:
        """A reload: new declared consumers and poll interval; stored data stays."""
        self.config = config
        self.poll_interval = float(config.store.poll_interval) or 0.5
        if self._hasher is not None:
            self._rebuild()

    # -- reading -------------------------------------------------------------------------------------
    def lookup(self, presented_key: bytes) -> KeyMatch | None:
        """The key's match if it is known (the caller checks deadline, CIDRs, windows, scopes)."""
        return self.keys.lookup(presented_key)

    def consumer(self, consumer_id: str) -> Consumer | None:
        return self._consumers.get(consumer_id)

    def consumers(self) -> list[Consumer]:
        return list(self._consumers.values())

    def consumer_count(self) -> int:
        return len(self._consumers)

    def key_count(self) -> int:
        return len(self.keys.by_digest)

    def client_secret(self, consumer_id: str) -> Login | None:
        """A consumer's stored client secret (oauth2-token's client credentials)."""
        return self._secrets.get(consumer_id)

    def login(self, username: str) -> Login | None:
        """A login: a config consumer's ``password_hash`` (the username is its id), else a password
        stored with ``apigate consumers set-password`` (basic-auth, oauth2-token)."""
        return self._logins.get(username)

    def token_revoked(self, jti: str) -> bool:
        """True if a JWT with this jti was revoked (``apigate tokens revoke``) and still is."""
        return jti in self._revoked_jtis

    # -- refreshing ----------------------------------------------------------------------------------
    async def refresh(self) -> bool:
        """Reload from the store if its change_version moved; True if it did."""
        version = await self.store.change_version()  # read first: a write after it triggers another load
        if version == self.version:
            self.loaded_at = time.time()
            return False
        consumers = await self.store.list_consumers()
        keys = await self.store.list_keys()
        revoked = await self.store.list_revoked_tokens()
        credentials = await self.store.list_credentials()
        self._stored_consumers = consumers
        self._stored_keys = keys
        self._stored_revoked = revoked
        self._stored_credentials = credentials
        self.version = version
        self.loaded_at = time.time()
        self._rebuild()
        return True

    def current_poll_interval(self) -> float:
        subscription = self._subscription
        if subscription is not None and subscription.active:
            return max(self.poll_interval, NOTIFIED_POLL_INTERVAL)
        return self.poll_interval

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.current_poll_interval())
            self._wake.clear()
            try:
                changed = await asyncio.wait_for(self.refresh(), REFRESH_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._poll_failed(exc)
                continue
            if self._failing_since is not None:
                log.warning(
                    "consumer store readable again after %.0fs", time.monotonic() - self._failing_since
                )
                self._failing_since = None
            if changed:
                log.debug(
                    "consumers reloaded (version %s): %d consumers, %d keys",
                    self.version,
                    len(self._consumers),
                    len(self.keys.by_digest),
                )

    def _poll_failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        first = self._failing_since is None
        if first:
            self._failing_since = now
        if first or now - self._failure_logged >= FAILURE_LOG_EVERY:
            self._failure_logged = now
            log.error(
                "cannot read the consumer store (%s: %s); serving the consumers loaded %.0fs ago",
                type(exc).__name__,
                exc,
                time.time() - self.loaded_at,
            )

    def _rebuild(self) -> None:
        """Build fresh dicts from the stored entities and the config's, then swap them in."""
        hasher = self._hasher
        assert hasher is not None
        now = time.time()
        consumers: dict[str, Consumer] = {c.id: c for c in self._stored_consumers}
        declared = self.config.consumers
        for item in declared:
            if item.id in consumers:
                log.warning(
                    "consumer %r is declared in the config and in the store; the config wins", item.id
                )
            consumers[item.id] = Consumer(
                id=item.id, tenant=item.tenant, groups=tuple(item.groups), metadata=dict(item.metadata)
            )
        keys: dict[bytes, KeyMatch] = {}
        for key in self._stored_keys:
            if key.revoked_at is not None and key.revoked_at <= now:
                continue  # revoked: never usable again
            if key.expires_at is not None and key.expires_at <= now:
                continue
            owner = consumers.get(key.consumer_id)
            if owner is None or owner.disabled:
                continue
            try:
                digest = bytes.fromhex(key.hash)
                keys[digest] = KeyMatch(key, owner)
            except ValueError as exc:
                log.error("key %s of consumer %s is unusable and skipped: %s", key.id, key.consumer_id, exc)
        for item in declared:
            self._add_declared(item, consumers[item.id], hasher, keys)
        self._consumers = consumers
        self.keys.replace(keys)
        self._secrets, self._logins = self._credentials(consumers)
        self._revoked_jtis = frozenset(
            token.jti
            for token in self._stored_revoked
            if token.expires_at is None or token.expires_at + REVOKED_TOKEN_GRACE > now
        )

    def _credentials(self, consumers: dict[str, Consumer]) -> tuple[dict[str, Login], dict[str, Login]]:
        """Parsed hashes of the stored credentials of enabled consumers, and of the config's."""
        secrets: dict[str, Login] = {}
        logins: dict[str, Login] = {}
        for credential in self._stored_credentials:
            owner = consumers.get(credential.consumer_id)
            if owner is None or owner.disabled:
                continue
            try:
                parsed = parse_hash(credential.hash)
            except ValueError as exc:
                log.error("credential %s is unusable and skipped: %s", credential.id, exc)
                continue
            login = Login(credential.consumer_id, parsed, frozenset(credential.scopes))
            if credential.kind == "secret":
                secrets[credential.consumer_id] = login
            elif credential.username is not None:
                logins[credential.username] = login
        for item in self.config.consumers:  # validated with the config: the hash parses
            if item.password_hash is not None:
                logins[item.id] = Login(item.id, parse_hash(item.password_hash), frozenset())
        return secrets, logins

    @staticmethod
    def _add_declared(
        item: ConsumerConfig, consumer: Consumer, hasher: KeyHasher, keys: dict[bytes, KeyMatch]
    ) -> None:
        for index, declared in enumerate(item.keys):
            plain = declared.key.get_secret_value()
            digest = hasher.digest(plain.encode())
            key = ApiKey(
                id=f"cfg_{digest.hex()[:12]}",
                consumer_id=item.id,
                hash=digest.hex(),
                prefix=display_prefix(plain),
                scopes=tuple(declared.scopes),
                allowed_cidrs=tuple(str(n) for n in declared.allowed_cidrs),
                time_windows=tuple(declared.time_windows),
                expires_at=declared.expires_at,
            )
            try:
                match = KeyMatch(key, consumer, declared=True)
            except ValueError as exc:
                log.error("consumers[%s].keys[%d] is unusable and skipped: %s", item.id, index, exc)
                continue
            if digest in keys and keys[digest].consumer.id != item.id:
                log.warning("consumers[%s].keys[%d] is also another consumer's key", item.id, index)
            keys[digest] = match
