"""Config pieces shared by the authentication policies (key-auth, basic-auth, hmac-auth, jwt)."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field, field_validator

from apigate.policies.base import PolicyConfig

# A realm goes inside a quoted WWW-Authenticate parameter.
_REALM = re.compile(r'^[^"\\\x00-\x1f\x7f]+$')


def check_realm(realm: str) -> str:
    if not _REALM.match(realm):
        raise ValueError("realm must be non-empty, without quotes, backslashes or control characters")
    return realm


class AuthConfig(PolicyConfig):
    """What every authentication policy takes: its realm and whether its credential is required."""

    realm: str = "apigate"
    required: bool = Field(
        default=True,
        description="false: a request without this credential goes on unidentified (for another auth "
        "policy or `authorize` to judge); a credential that is present must still be valid",
    )

    _realm = field_validator("realm")(classmethod(lambda cls, v: check_realm(v)))


def check_forwarded_names(forward_headers: BaseModel, credential_header: str) -> None:
    """Forwarded identity headers must differ from each other and from the credential's header."""
    forwarded = [n.lower() for n in forward_headers.model_dump().values() if n is not None]
    if len(forwarded) != len(set(forwarded)):
        raise ValueError("forward_headers names must differ from each other")
    if credential_header.lower() in forwarded:
        raise ValueError(f"{credential_header} carries the credential and cannot be a forwarded header")
