"""What a verifier is given, what it answers, and the stable reason codes of its answers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    method: str
    """"POST", or "GET" for InPost's URL check."""
    url: str
    """The public URL as the sender saw it: scheme://host/path?query (rebuilt behind trusted proxies)."""
    headers: Mapping[str, str]
    """Lower-case header name -> value (first occurrence), latin-1 decoded."""
    body: bytes
    """The exact raw bytes, nothing parsed before verification."""
    client_ip: str
    now: float
    """Unix seconds from an injectable clock."""


class Reason(StrEnum):
    """Why a verdict is what it is; the values are stable codes for logs, metrics and tests."""

    OK = "ok"
    HANDSHAKE = "handshake"
    """Authentic, but a protocol check rather than an event: reply with ``answer``, store nothing."""
    SENDER_NOT_ALLOWED = "sender_not_allowed"
    MISSING_SIGNATURE = "missing_signature"
    MALFORMED_SIGNATURE = "malformed_signature"
    BAD_SIGNATURE = "bad_signature"
    MISSING_TIMESTAMP = "missing_timestamp"
    MALFORMED_TIMESTAMP = "malformed_timestamp"
    STALE_TIMESTAMP = "stale_timestamp"
    """Outside the tolerance, in the past or in the future."""
    MISSING_ID = "missing_id"
    MISSING_TOKEN = "missing_token"
    BAD_TOKEN = "bad_token"
    MISSING_CREDENTIALS = "missing_credentials"
    MALFORMED_CREDENTIALS = "malformed_credentials"
    BAD_CREDENTIALS = "bad_credentials"
    MALFORMED_BODY = "malformed_body"
    BAD_BODY_HASH = "bad_body_hash"
    VERIFICATION_ERROR = "verification_error"
    """An unexpected failure inside the verifier; the request is refused and the error logged."""


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str
    """``Reason.OK`` or another ``Reason`` code."""
    message: str = ""
    """Names the header or field at fault; never echoes secrets, expected or received signatures."""
    event_id: str | None = None
    """The provider's event id for de-duplication; None when the scheme or the request has none."""
    event_type: str | None = None
    answer: tuple[int, bytes, bytes] | None = None
    """(status, body, content-type) when the scheme itself must answer (InPost's GET URL check,
    Slack's url_verification); ``ok`` is then True and ``reason`` is ``handshake``."""


class Verifier(Protocol):
    credential_headers: frozenset[str]
    """Lower-case names of headers that carry a secret (a shared token, Basic credentials): they
    are neither stored nor passed on."""

    def verify(self, request: WebhookRequest) -> Verdict: ...
