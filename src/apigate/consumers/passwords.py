"""Password hashes (basic-auth passwords, client secrets and login passwords of the store's
credentials): scrypt, encoded as ``scrypt$n$r$p$salt_b64$hash_b64``.

Verification is slow by design (about 50 ms with the defaults), so policies run it off the
event loop (``check_password_off_loop``) and cache successes. The comparison is constant-time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import os
from dataclasses import dataclass

N, R, P = 2**14, 8, 1
SALT_BYTES = 16
HASH_BYTES = 32
PREFIX = "scrypt"


@dataclass(frozen=True, slots=True)
class PasswordHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def verify(self, password: bytes) -> bool:
        derived = _derive(password, self.salt, self.n, self.r, self.p, len(self.digest))
        return hmac.compare_digest(derived, self.digest)


def _derive(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # OpenSSL needs about 128*r*(n+p) bytes; the bounds in parse_hash keep this under 256 MiB.
    maxmem = 128 * r * (n + p + 2) + (1 << 20)
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str | bytes, n: int = N, r: int = R, p: int = P) -> str:
    raw = password.encode() if isinstance(password, str) else password
    salt = os.urandom(SALT_BYTES)
    digest = _derive(raw, salt, n, r, p, HASH_BYTES)
    return f"{PREFIX}${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def parse_hash(text: str) -> PasswordHash:
    """The parsed hash; ValueError with a message for people if ``text`` is not one."""
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != PREFIX:
        raise ValueError(
            "password_hash must look like scrypt$n$r$p$salt_b64$hash_b64 (see `apigate hash-password`)"
        )
    try:
        n, r, p = (int(x) for x in parts[1:4])
    except ValueError:
        raise ValueError("password_hash: n, r and p must be integers") from None
    if n < 2**10 or n > 2**20 or n & (n - 1):
        raise ValueError("password_hash: n must be a power of 2 between 1024 and 1048576")
    if not 1 <= r <= 32 or not 1 <= p <= 16 or 128 * r * n > 256 * 2**20:
        raise ValueError("password_hash: r must be 1-32, p 1-16, and 128*n*r at most 256 MiB")
    try:
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("password_hash: salt and hash must be base64") from None
    if not 8 <= len(salt) <= 64 or not 16 <= len(digest) <= 64:
        raise ValueError("password_hash: the salt must be 8-64 bytes and the hash 16-64 bytes")
    return PasswordHash(n, r, p, salt, digest)


@functools.cache
def _dummy() -> PasswordHash:
    """A hash to verify against for unknown names, so they cost what a wrong password costs."""
    return parse_hash(hash_password(b"apigate-unknown-name"))


def check_password(stored: PasswordHash | None, password: bytes) -> bool:
    """Verify; for an unknown name (``stored`` None) burn the same time and say no. Slow: call it
    through ``check_password_off_loop`` from the event loop."""
    if stored is None:
        _dummy().verify(password)
        return False
    return stored.verify(password)


# Checks are slow on purpose (scrypt): a flood of them must not queue without bound behind the
# executor, making every login wait longer and longer. Past this many in flight, callers are told
# to come back (503) at once.
MAX_PENDING_CHECKS = 64
_pending_checks = 0


class PasswordChecksBusy(Exception):
    """Too many password checks are in flight in this process; try again shortly."""


async def check_password_off_loop(stored: PasswordHash | None, password: bytes) -> bool:
    """``check_password`` in the default executor, so the event loop keeps serving meanwhile."""
    global _pending_checks
    if _pending_checks >= MAX_PENDING_CHECKS:
        raise PasswordChecksBusy
    _pending_checks += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(None, check_password, stored, password)
    finally:
        _pending_checks -= 1


def verify_password(password: str | bytes, encoded: str) -> bool:
    raw = password.encode() if isinstance(password, str) else password
    return parse_hash(encoded).verify(raw)
