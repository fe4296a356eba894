"""Client secrets and login passwords, kept as scrypt hashes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

CREDENTIAL_KINDS = ("secret", "password")


@dataclass(frozen=True, slots=True)
class Credential:
    """A consumer's client secret (kind "secret") or login password (kind "password", with its
    ``username``), kept only as an scrypt hash (see ``consumers/passwords.py``)."""

    consumer_id: str
    kind: str  # one of CREDENTIAL_KINDS
    hash: str
    username: str | None = None  # logins only; a username belongs to one consumer
    scopes: tuple[str, ...] = ()  # what tokens issued for it may carry (oauth2-token)
    created_at: float = 0.0

    @property
    def id(self) -> str:
        """What the credential is for; setting one with the same id replaces it."""
        return f"secret:{self.consumer_id}" if self.kind == "secret" else f"password:{self.username}"


class CredentialStore(Protocol):
    """Consumers' credentials; every write advances the change feed."""

    async def set_credential(self, credential: Credential) -> None:
        """Add a credential, or replace the one with its id; ValueError if its username belongs to
        another consumer."""

    async def list_credentials(self, consumer_id: str | None = None) -> list[Credential]: ...

    async def delete_credential(self, credential_id: str) -> bool:
        """False if no credential has this id."""
