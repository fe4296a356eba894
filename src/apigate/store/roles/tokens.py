"""Revoked tokens: the jwt policy's ``jti`` denylist."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RevokedToken:
    """A JWT refused by its ``jti``; ``expires_at`` is when the denial may end (the token's own
    expiry), None to keep it for good."""

    jti: str
    expires_at: float | None = None  # unix seconds
    reason: str | None = None
    created_at: float = 0.0


class RevokedTokenStore(Protocol):
    async def revoke_token(self, token: RevokedToken) -> None:
        """Add a revoked jti, or replace its expires_at and reason; advances change_version."""

    async def list_revoked_tokens(self) -> list[RevokedToken]: ...

    async def purge_revoked_tokens(self, expired_before: float) -> int:
        """Delete entries that expired before this time; returns how many. Records no change: an
        expired entry denies nothing, so readers need not reload."""
