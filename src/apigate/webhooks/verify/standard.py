"""Standard Webhooks (and Svix, which sends the same headers named ``svix-*``).

``webhook-signature`` is a space-separated list of ``<version>,<base64>``: ``v1`` is the
HMAC-SHA256 of ``"{webhook-id}.{webhook-timestamp}.{body}"`` keyed with the base64-decoded part
of a ``whsec_…`` secret; ``v1a`` is the Ed25519 signature of the same content, checked with
``whpk_…`` public keys. Unknown versions are skipped; the timestamp must be within 5 minutes
either way.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Literal, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import Field, SecretStr, field_validator, model_validator

from apigate.webhooks.verify.common import (
    MAX_SIGNATURES,
    BodyJson,
    HmacKeys,
    Refused,
    SchemeBase,
    SchemeVerifier,
    Timestamp,
    Tolerance,
    from_json,
    header_value,
    signed_bytes,
)
from apigate.webhooks.verify.model import Reason, Verdict, WebhookRequest

SECRET_PREFIX = "whsec_"
PUBLIC_KEY_PREFIX = "whpk_"
ED25519_SIGNATURE_SIZE = 64
# Header families: the standard's names, then Svix's; a request is read in one family only.
FAMILIES = (
    ("webhook-id", "webhook-timestamp", "webhook-signature"),
    ("svix-id", "svix-timestamp", "svix-signature"),
)


def _unpadded_base64(text: str) -> bytes:
    """Decodes base64 whether or not its padding was kept (secrets are often copied without it)."""
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def signing_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_…`` secret (the prefix is optional)."""
    try:
        key = _unpadded_base64(secret.removeprefix(SECRET_PREFIX))
    except (binascii.Error, ValueError):
        raise ValueError("a secret must be whsec_ followed by base64") from None
    if not key:
        raise ValueError("a secret cannot be empty")
    return key


def public_key(text: str) -> Ed25519PublicKey:
    try:
        raw = _unpadded_base64(text.removeprefix(PUBLIC_KEY_PREFIX))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError("a public key must be whpk_ followed by the base64 of 32 bytes (Ed25519)")
    return Ed25519PublicKey.from_public_bytes(raw)


class StandardWebhooksConfig(SchemeBase):
    """Event id: ``webhook-id`` (``svix-id``); type: body ``type``."""

    scheme: Literal["standard"]
    secrets: list[SecretStr] = Field(default=[], description="whsec_… secrets (v1 signatures)")
    public_keys: list[str] = Field(default=[], description="whpk_… Ed25519 public keys (v1a signatures)")
    tolerance: Tolerance = 300.0

    @field_validator("secrets")
    @classmethod
    def _secrets_decode(cls, secrets: list[SecretStr]) -> list[SecretStr]:
        for secret in secrets:
            signing_key(secret.get_secret_value())
        return secrets

    @field_validator("public_keys")
    @classmethod
    def _public_keys_decode(cls, keys: list[str]) -> list[str]:
        for key in keys:
            public_key(key)
        return keys

    @model_validator(mode="after")
    def _has_a_key(self) -> Self:
        if not self.secrets and not self.public_keys:
            raise ValueError("give secrets (whsec_…), public_keys (whpk_…) or both")
        return self

    def build(self) -> StandardWebhooksVerifier:
        return StandardWebhooksVerifier(self)


def _signed_family(request: WebhookRequest) -> tuple[str, str, str]:
    """The header family that carries the signature; its id and timestamp are the signed ones."""
    return next((family for family in FAMILIES if family[2] in request.headers), FAMILIES[0])


def _signed_id(request: WebhookRequest, _body: BodyJson) -> str | None:
    # The id of the family that was verified, never another family's unsigned header: otherwise a
    # captured svix-* request could be replayed as new with a made-up webhook-id.
    return request.headers.get(_signed_family(request)[0]) or None


class StandardWebhooksVerifier(SchemeVerifier):
    def __init__(self, config: StandardWebhooksConfig) -> None:
        super().__init__(
            config,
            event_id=_signed_id,
            event_type=from_json("type"),
        )
        self._hmac_keys = HmacKeys((signing_key(s.get_secret_value()) for s in config.secrets), "sha256")
        self._public_keys = tuple(public_key(key) for key in config.public_keys)
        self._tolerance = config.tolerance

    def check(self, request: WebhookRequest, body: BodyJson) -> Verdict | None:
        id_name, timestamp_name, signature_name = _signed_family(request)
        value = header_value(request, (signature_name,), Reason.MISSING_SIGNATURE, Reason.MALFORMED_SIGNATURE)
        event_id = header_value(request, (id_name,), Reason.MISSING_ID, Reason.MISSING_ID)
        timestamp = Timestamp.from_header(request, timestamp_name)
        entries = value.split()
        if len(entries) > MAX_SIGNATURES:
            raise Refused(
                Reason.MALFORMED_SIGNATURE, f"{signature_name} has more than {MAX_SIGNATURES} entries"
            )
        hmacs = list(self._decoded(entries, "v1", self._hmac_keys.digest_size))
        ed25519s = list(self._decoded(entries, "v1a", ED25519_SIGNATURE_SIZE))
        if not hmacs and not ed25519s:
            raise Refused(Reason.MALFORMED_SIGNATURE, f"{signature_name} has no v1 or v1a signature")
        content = (signed_bytes(event_id, id_name), b".", timestamp.text.encode("ascii"), b".", request.body)
        if not (
            self._hmac_keys.matches(hmacs, content) or self._ed25519_matches(ed25519s, b"".join(content))
        ):
            raise Refused(Reason.BAD_SIGNATURE, f"no {signature_name} signature matches under any key")
        timestamp.require_within(self._tolerance, request.now)
        return None

    @staticmethod
    def _decoded(entries: Iterable[str], version: str, size: int) -> Iterable[bytes]:
        for entry in entries:
            entry_version, _, text = entry.partition(",")
            if entry_version == version:
                try:
                    signature = base64.b64decode(text, validate=True)
                except (binascii.Error, ValueError):
                    continue
                if len(signature) == size:
                    yield signature

    def _ed25519_matches(self, signatures: list[bytes], content: bytes) -> bool:
        for key in self._public_keys:
            for signature in signatures:
                try:
                    key.verify(signature, content)
                except InvalidSignature:
                    continue
                return True
        return False
