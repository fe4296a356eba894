"""Operations on consumers and API keys, as the CLI (and later the admin API) performs them.

Every write goes to the store, which advances its change_version, and then announces the change
on the state backend's ``CHANGES_CHANNEL``: with Redis every gateway reloads at once; without it
(or if the notice is lost) they pick the change up on their next poll (``store.poll_interval``).
A key's plaintext exists only in the return value of ``create_key``/``rotate_key``: the store
keeps its hash.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from apigate.consumers.keys import KeyHasher, display_prefix, generate_key, generate_key_id, load_key_secret
from apigate.consumers.passwords import hash_password
from apigate.consumers.windows import WindowError, check_windows
from apigate.state import StateUnavailable
from apigate.store.roles.consumers import ApiKey, Consumer, ConsumerStore
from apigate.store.roles.credentials import Credential, CredentialStore
from apigate.store.roles.settings import SettingStore
from apigate.store.roles.tokens import RevokedToken, RevokedTokenStore

if TYPE_CHECKING:
    from apigate.state import StateBackend

log = logging.getLogger("apigate.consumers")

DEFAULT_ROTATION_GRACE = 24 * 3600.0
CHANGES_CHANNEL = "changes"
"""Where writers announce a committed change to consumers, keys or revoked tokens."""
# A revoked jti stays denied this long past its end: the jwt policy accepts a token up to its
# `leeway` (at most 1 h) after the token's exp.
REVOKED_TOKEN_GRACE = 3600.0
MAX_JTI_LENGTH = 1024
CONSUMER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,199}$")
# Login names for stored passwords; no ":" (HTTP Basic ends the username there).
USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,199}$")
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_BYTES = 1024
_TOKEN = re.compile(r"^[\x21-\x7e]{1,200}$")  # scopes, groups, tenants: printable, no spaces
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)?\s*$", re.IGNORECASE)
_DURATION_FACTOR = {None: 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class ConsumerError(Exception):
    """An operation that cannot be done; the message is meant for the person who asked."""


class NotFound(ConsumerError):
    pass


class Conflict(ConsumerError):
    pass


class Invalid(ConsumerError):
    pass


@dataclass(frozen=True)
class NewKey:
    """A key just created: the stored record and the plaintext, which is never available again."""

    key: ApiKey
    plaintext: str


# -- parsing and validation ------------------------------------------------------------------------
def parse_duration(text: str) -> float:
    """Seconds from "90s", "30m", "24h", "30d", "2w" or a number of seconds."""
    match = _DURATION.match(str(text))
    if not match:
        raise Invalid(f"{text!r} is not a duration (for example 90s, 30m, 24h, 30d, 2w)")
    unit = match.group(2).lower() if match.group(2) else None
    return float(match.group(1)) * _DURATION_FACTOR[unit]


def parse_expiry(text: str, now: float | None = None) -> float:
    """Unix seconds from an ISO 8601 time (UTC if it names no zone) or a duration from now ("30d")."""
    now = time.time() if now is None else now
    text = str(text).strip()
    if _DURATION.match(text):
        at = now + parse_duration(text)
    else:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
        except ValueError:
            raise Invalid(
                f"{text!r} is neither an ISO 8601 time (2030-01-31T18:00:00Z) nor a duration (30d, 12h)"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        at = moment.timestamp()
    if at <= now:
        raise Invalid(f"expiry {text!r} is not in the future")
    return at


def check_consumer_id(consumer_id: str) -> str:
    if not CONSUMER_ID.match(consumer_id or ""):
        raise Invalid(
            f"consumer id {consumer_id!r} is not valid: 1-200 characters, letters, digits and . _ : @ + -, "
            "starting with a letter or digit"
        )
    return consumer_id


def _tokens(values: Iterable[str], what: str) -> tuple[str, ...]:
    out: list[str] = []
    for value in values:
        if not _TOKEN.match(value or ""):
            raise Invalid(f"{what} {value!r} is not valid: 1-200 printable characters without spaces")
        if value not in out:
            out.append(value)
    return tuple(out)


def check_cidrs(values: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for value in values:
        try:
            network = ipaddress.ip_network(str(value).strip(), strict=False)
        except ValueError:
            raise Invalid(
                f"{value!r} is not an IP network (for example 10.0.0.0/8 or 2001:db8::/32)"
            ) from None
        if str(network) not in out:
            out.append(str(network))
    return tuple(out)


def check_time_windows(values: Iterable[str]) -> tuple[str, ...]:
    try:
        return tuple(check_windows(list(values)))
    except WindowError as exc:
        raise Invalid(str(exc)) from None


def parse_metadata(pairs: Iterable[str]) -> dict[str, str]:
    """``["team=billing", "tier=gold"]`` → ``{"team": "billing", "tier": "gold"}``."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise Invalid(f"metadata {pair!r} is not key=value")
        out[name.strip()] = value
    return out


def key_status(key: ApiKey, now: float | None = None) -> str:
    """active, expired, revoked, or rotating (revoked at a future time: still valid until then)."""
    now = time.time() if now is None else now
    if key.revoked_at is not None:
        return "revoked" if key.revoked_at <= now else "rotating"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def consumer_dict(consumer: Consumer) -> dict[str, Any]:
    return {
        "id": consumer.id,
        "tenant": consumer.tenant,
        "groups": list(consumer.groups),
        "metadata": dict(consumer.metadata),
        "disabled": consumer.disabled,
        "created_at": consumer.created_at,
    }


def revoked_token_dict(token: RevokedToken) -> dict[str, Any]:
    return {
        "jti": token.jti,
        "expires_at": token.expires_at,
        "reason": token.reason,
        "created_at": token.created_at,
    }


def key_dict(key: ApiKey, now: float | None = None) -> dict[str, Any]:
    """A key as shown to people and scripts: never the hash, never the key."""
    return {
        "id": key.id,
        "consumer_id": key.consumer_id,
        "prefix": key.prefix,
        "status": key_status(key, now),
        "scopes": list(key.scopes),
        "allowed_cidrs": list(key.allowed_cidrs),
        "time_windows": list(key.time_windows),
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "created_at": key.created_at,
        "rotated_from": key.rotated_from,
    }


def _check_password(password: str, what: str) -> None:
    if len(password) < MIN_PASSWORD_CHARS or len(password.encode()) > MAX_PASSWORD_BYTES:
        raise Invalid(f"the {what} must be {MIN_PASSWORD_CHARS} characters to {MAX_PASSWORD_BYTES} bytes")


def credential_dict(credential: Credential) -> dict[str, Any]:
    """A credential as shown: never its hash."""
    return {
        "id": credential.id,
        "consumer_id": credential.consumer_id,
        "kind": credential.kind,
        "username": credential.username,
        "scopes": list(credential.scopes),
        "created_at": credential.created_at,
    }


# -- operations --------------------------------------------------------------------------------------
class ConsumerRecords(ConsumerStore, CredentialStore, RevokedTokenStore, SettingStore, Protocol):
    """What consumers are made of in the store; the key-hash secret is a setting."""


StoreT = TypeVar("StoreT", bound=ConsumerRecords)


class ConsumerService(Generic[StoreT]):
    """The operations behind the CLI on the store it was given; the store keeps its own type, so a
    command that opened the whole store reaches its other roles through ``service.store``."""

    def __init__(
        self, store: StoreT, clock: Callable[[], float] = time.time, state: StateBackend | None = None
    ) -> None:
        self.store = store
        self.clock = clock
        self.state = state
        self._hasher: KeyHasher | None = None

    async def _announce(self, entity: str) -> None:
        """Tell running gateways to reload now; if that fails they still find it on their next poll."""
        if self.state is None:
            return
        try:
            await self.state.publish(CHANGES_CHANNEL, entity.encode())
        except StateUnavailable as exc:
            log.warning("change saved but not announced (%s); gateways see it on their next poll", exc)

    async def hasher(self) -> KeyHasher:
        if self._hasher is None:
            self._hasher = KeyHasher(await load_key_secret(self.store))
        return self._hasher

    # -- consumers -------------------------------------------------------------------------------------
    async def create_consumer(
        self,
        consumer_id: str,
        tenant: str | None = None,
        groups: Iterable[str] = (),
        metadata: Mapping[str, Any] | None = None,
    ) -> Consumer:
        check_consumer_id(consumer_id)
        if tenant is not None:
            _tokens([tenant], "tenant")
        consumer = Consumer(
            id=consumer_id,
            tenant=tenant,
            groups=_tokens(groups, "group"),
            metadata=dict(metadata or {}),
            created_at=self.clock(),
        )
        if await self.store.get_consumer(consumer_id) is not None:
            raise Conflict(f"consumer {consumer_id!r} already exists")
        await self.store.upsert_consumer(consumer)
        await self._announce("consumer")
        return consumer

    async def list_consumers(self, tenant: str | None = None) -> list[Consumer]:
        return await self.store.list_consumers(tenant)

    async def get_consumer(self, consumer_id: str) -> Consumer:
        consumer = await self.store.get_consumer(consumer_id)
        if consumer is None:
            raise NotFound(f"no consumer {consumer_id!r}")
        return consumer

    async def set_disabled(self, consumer_id: str, disabled: bool) -> Consumer:
        """A disabled consumer's keys are refused (401 invalid_key) until it is enabled again."""
        consumer = replace(await self.get_consumer(consumer_id), disabled=disabled)
        await self.store.upsert_consumer(consumer)
        await self._announce("consumer")
        return consumer

    async def delete_consumer(self, consumer_id: str) -> None:
        """Deletes the consumer and all its keys."""
        if not await self.store.delete_consumer(consumer_id):
            raise NotFound(f"no consumer {consumer_id!r}")
        await self._announce("consumer")

    # -- keys --------------------------------------------------------------------------------------------
    async def create_key(
        self,
        consumer_id: str,
        scopes: Iterable[str] = (),
        allowed_cidrs: Iterable[str] = (),
        time_windows: Iterable[str] = (),
        expires_at: float | None = None,
        rotated_from: str | None = None,
    ) -> NewKey:
        scopes_ = _tokens(scopes, "scope")
        cidrs = check_cidrs(allowed_cidrs)
        windows = check_time_windows(time_windows)
        now = self.clock()
        if expires_at is not None and expires_at <= now:
            raise Invalid("the expiry is not in the future")
        await self.get_consumer(consumer_id)
        hasher = await self.hasher()
        plaintext = generate_key()
        key = ApiKey(
            id=generate_key_id(),
            consumer_id=consumer_id,
            hash=hasher.hash(plaintext),
            prefix=display_prefix(plaintext),
            scopes=scopes_,
            allowed_cidrs=cidrs,
            time_windows=windows,
            expires_at=expires_at,
            created_at=now,
            rotated_from=rotated_from,
        )
        await self.store.add_key(key)
        await self._announce("api_key")
        return NewKey(key, plaintext)

    async def list_keys(self, consumer_id: str | None = None) -> list[ApiKey]:
        if consumer_id is not None:
            await self.get_consumer(consumer_id)
        return await self.store.list_keys(consumer_id)

    async def get_key(self, key_id: str) -> ApiKey:
        key = await self.store.get_key(key_id)
        if key is None:
            raise NotFound(f"no API key {key_id!r}")
        return key

    async def revoke_key(self, key_id: str) -> ApiKey:
        """Refused from now on (every gateway within one poll interval). Revoking twice is a no-op."""
        key = await self.get_key(key_id)
        now = self.clock()
        if key.revoked_at is not None and key.revoked_at <= now:
            return key
        key = replace(key, revoked_at=now)
        await self.store.update_key(key)
        await self._announce("api_key")
        return key

    async def rotate_key(self, key_id: str, grace: float = DEFAULT_ROTATION_GRACE) -> tuple[NewKey, ApiKey]:
        """A new key with the old one's scopes, CIDRs, windows and expiry; the old one stays valid
        for ``grace`` seconds. Returns (the new key, the old key as updated)."""
        if grace < 0:
            raise Invalid("the grace period cannot be negative")
        old = await self.get_key(key_id)
        now = self.clock()
        status = key_status(old, now)
        if status in ("revoked", "expired"):
            raise Conflict(f"API key {key_id!r} is {status} and cannot be rotated")
        new = await self.create_key(
            old.consumer_id,
            scopes=old.scopes,
            allowed_cidrs=old.allowed_cidrs,
            time_windows=old.time_windows,
            expires_at=old.expires_at,
            rotated_from=old.id,
        )
        ends = now + grace
        if old.revoked_at is not None:
            ends = min(ends, old.revoked_at)
        old = replace(old, revoked_at=ends)
        await self.store.update_key(old)
        await self._announce("api_key")
        return new, old

    # -- credentials (client secrets and login passwords, kept as scrypt hashes) --------------------------
    async def set_secret(self, consumer_id: str, secret: str, scopes: Iterable[str] = ()) -> Credential:
        """Set (or replace) the consumer's client secret: with its id as client id, it gets tokens
        from the oauth2-token policy, with at most these scopes."""
        _check_password(secret, "client secret")
        allowed = _tokens(scopes, "scope")
        await self.get_consumer(consumer_id)
        credential = Credential(
            consumer_id, "secret", hash_password(secret), scopes=allowed, created_at=self.clock()
        )
        await self.store.set_credential(credential)
        await self._announce("credential")
        return credential

    async def set_password(
        self, consumer_id: str, username: str, password: str, scopes: Iterable[str] = ()
    ) -> Credential:
        """Set (or replace) the password of a login name that belongs to the consumer (oauth2-token's
        login, with at most these scopes; basic-auth)."""
        if not USERNAME.match(username or ""):
            raise Invalid(
                f"username {username!r} is not valid: 1-200 characters, letters, digits and . _ @ + -, "
                "starting with a letter or digit"
            )
        _check_password(password, "password")
        allowed = _tokens(scopes, "scope")
        await self.get_consumer(consumer_id)
        credential = Credential(
            consumer_id,
            "password",
            hash_password(password),
            username=username,
            scopes=allowed,
            created_at=self.clock(),
        )
        try:
            await self.store.set_credential(credential)
        except ValueError as exc:
            raise Conflict(f"username {username!r}: {exc}") from None
        await self._announce("credential")
        return credential

    # -- revoked tokens (the jwt policy's jti denylist) -----------------------------------------------------
    async def revoke_token(
        self, jti: str, until: float | None = None, reason: str | None = None
    ) -> RevokedToken:
        """Refuse JWTs with this ``jti`` (on routes whose jwt policy has ``check_revoked``) until
        ``until`` (give the token's exp so the entry can be purged), or for good if None."""
        if not jti or len(jti) > MAX_JTI_LENGTH or not jti.isprintable():
            raise Invalid(f"a jti is 1-{MAX_JTI_LENGTH} printable characters")
        if reason is not None and (len(reason) > 500 or not reason.isprintable()):
            raise Invalid("the reason is at most 500 printable characters")
        now = self.clock()
        if until is not None and until <= now:
            raise Invalid("--until is not in the future")
        token = RevokedToken(jti=jti, expires_at=until, reason=reason, created_at=now)
        await self.store.revoke_token(token)
        await self._announce("revoked_token")
        await self.purge_revoked_tokens()
        return token

    async def list_revoked_tokens(self) -> list[RevokedToken]:
        await self.purge_revoked_tokens()
        return await self.store.list_revoked_tokens()

    async def purge_revoked_tokens(self) -> int:
        """Delete entries past their end (and the grace); returns how many."""
        return await self.store.purge_revoked_tokens(self.clock() - REVOKED_TOKEN_GRACE)
