"""API key material: generation, the keyed hash the store keeps, the display prefix.

A key is ``ak_`` and 32 base62 characters from ``secrets`` (about 190 bits). The store never
holds a key, only its HMAC-SHA256 under the gateway's key-hash secret (hex) and its first
8 characters for people to recognise it. The secret comes from ``APIGATE_KEY_SECRET`` if set,
else it is generated once and kept in the store (first writer wins), so every worker, every
node and the CLI hash alike.

Lookups compare HMAC outputs, never keys: a dict probe on a digest that only the secret's
holder can compute leaks nothing usable through its timing. Where a presented key is checked
against one stored hash, ``matches`` compares in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import string
from typing import TYPE_CHECKING

try:  # CPython's own SHA-256 copies its state faster than OpenSSL 3's EVP contexts do
    from _sha256 import sha256 as _sha256
except ImportError:  # pragma: no cover - other interpreters and versions
    from hashlib import sha256 as _sha256

if TYPE_CHECKING:
    from apigate.store.roles.settings import SettingStore

KEY_PREFIX = "ak_"
KEY_RANDOM_CHARS = 32
DISPLAY_PREFIX_CHARS = 8
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
SECRET_ENV = "APIGATE_KEY_SECRET"
SECRET_SETTING = "key_hash_secret"

_BLOCK = 64  # SHA-256 block size, for HMAC's pads


def generate_key() -> str:
    """A new API key: ``ak_`` + 32 base62 characters."""
    return KEY_PREFIX + "".join(secrets.choice(BASE62) for _ in range(KEY_RANDOM_CHARS))


def generate_key_id() -> str:
    """A key's public identifier (what `keys revoke` takes); unrelated to the key itself."""
    return "key_" + "".join(secrets.choice(BASE62) for _ in range(16))


def display_prefix(key: str | bytes) -> str:
    """The first 8 characters, e.g. ``ak_Xy12a``: enough to recognise a key, useless to guess it."""
    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
    return text[:DISPLAY_PREFIX_CHARS]


class KeyHasher:
    """HMAC-SHA256 under one secret, with the padded key states computed once.

    Same output as ``hmac.new(secret, key, sha256)``, more than twice as fast per call as
    ``hmac.digest`` on OpenSSL 3 (which pays a provider lookup on every call). It is on the hot path.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("the key-hash secret cannot be empty")
        if len(secret) > _BLOCK:
            secret = hashlib.sha256(secret).digest()
        secret = secret.ljust(_BLOCK, b"\0")
        self._inner = _sha256(bytes(b ^ 0x36 for b in secret))
        self._outer = _sha256(bytes(b ^ 0x5C for b in secret))

    def digest(self, key: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(key)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def hash(self, key: str | bytes) -> str:
        """The hex hash the store keeps."""
        return self.digest(key.encode() if isinstance(key, str) else key).hex()

    def matches(self, key: str | bytes, stored_hash: str) -> bool:
        """Whether ``key`` hashes to ``stored_hash``, compared in constant time."""
        return hmac.compare_digest(self.hash(key), stored_hash.lower())


def hash_key(secret: bytes, key: str | bytes) -> str:
    """Hex HMAC-SHA256 of ``key`` under ``secret`` (the reference form of ``KeyHasher.hash``)."""
    return hmac.new(secret, key.encode() if isinstance(key, str) else key, hashlib.sha256).hexdigest()


async def load_key_secret(store: SettingStore) -> bytes:
    """``$APIGATE_KEY_SECRET``, else the store's ``key_hash_secret`` (created by the first caller)."""
    from_env = os.environ.get(SECRET_ENV)
    if from_env:
        return from_env.encode()
    value = await store.set_setting(SECRET_SETTING, secrets.token_urlsafe(32), only_if_absent=True)
    return value.encode()
