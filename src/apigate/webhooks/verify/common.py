"""What every scheme shares: the config base, keyed HMACs and token digests, signature decoding,
timestamps, the sender allowlist, where the event id and type come from, and the verify steps.

Each scheme's ``check`` raises ``Refused`` for a request it refuses; ``SchemeVerifier.verify``
turns that into a ``Verdict``, so no scheme builds refusals by hand.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, IPvAnyNetwork, SecretStr

from apigate.config.headernames import HEADER_NAME
from apigate.config.units import Duration
from apigate.httpspec import address_in
from apigate.webhooks.verify.model import Reason, Verdict, WebhookRequest

if TYPE_CHECKING:
    from apigate.webhooks.verify.model import Verifier

logger = logging.getLogger("apigate.webhooks.verify")

MAX_HEADER_CHARS = 8192
"""Longer signature and credential headers are refused before any parsing."""
MAX_SIGNATURES = 16
"""A signature list with more entries is malformed: it bounds the HMACs computed per request."""
MAX_EVENT_ID_CHARS = 512
"""Longer ids are replaced by their SHA-256, so a de-duplication key stays small."""

Encoding = Literal["hex", "base64"]
TimestampFormat = Literal["unix", "unix_ms", "iso8601"]


def _header_name(name: str) -> str:
    if not HEADER_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid header name")
    return name.lower()


def _non_empty_secrets(secrets: list[SecretStr]) -> list[SecretStr]:
    if any(not secret.get_secret_value() for secret in secrets):
        raise ValueError("a secret cannot be empty")
    return secrets


HeaderName = Annotated[str, AfterValidator(_header_name)]
JsonPath = Annotated[str, Field(pattern=r"^[^.\s]+(\.[^.\s]+)*$", description="dotted path, e.g. event.type")]
Secrets = Annotated[
    list[SecretStr],
    Field(min_length=1, description="active secrets; any of them may match (rotation)"),
    AfterValidator(_non_empty_secrets),
]

Tolerance = Annotated[
    Duration, Field(gt=0, description="how far (seconds, or 30s, 5m) a signed timestamp may be from now")
]


class SchemeBase(BaseModel, ABC):
    """Options every scheme takes. The id/type overrides replace the preset's own source."""

    # The input holds secrets: errors from validating a scheme directly do not echo it (a model
    # embedding one decides for its own errors; the config loader never prints inputs).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    allowed_cidrs: list[IPvAnyNetwork] | None = Field(
        default=None, description="sender allowlist, checked before anything else (none: any sender)"
    )
    id_header: HeaderName | None = Field(default=None, description="header carrying the event id")
    id_json_path: JsonPath | None = Field(default=None, description="body field carrying the event id")
    type_header: HeaderName | None = Field(default=None, description="header carrying the event type")
    type_json_path: JsonPath | None = Field(default=None, description="body field carrying the event type")

    @abstractmethod
    def build(self) -> Verifier:
        """The verifier for this config, with its key material computed once."""


class Refused(Exception):
    """Raised inside a scheme's check; becomes a refusing Verdict."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def secret_bytes(secrets: Iterable[SecretStr]) -> list[bytes]:
    return [secret.get_secret_value().encode("utf-8") for secret in secrets]


class HmacKeys:
    """The configured secrets keyed once for one digest; a signature made with any of them matches."""

    __slots__ = ("_states", "digest_size")

    def __init__(self, keys: Iterable[bytes], digest: str) -> None:
        self._states = tuple(hmac.new(key, digestmod=digest) for key in keys)
        self.digest_size = hashlib.new(digest).digest_size

    def matches(self, signatures: Collection[bytes], parts: Iterable[bytes]) -> bool:
        parts = tuple(parts)
        for state in self._states:
            mac = state.copy()
            for part in parts:
                mac.update(part)
            expected = mac.digest()
            if any(hmac.compare_digest(expected, signature) for signature in signatures):
                return True
        return False


class TokenSet:
    """Shared tokens compared as SHA-256 digests, so the comparison time reveals neither a token's
    content nor its length."""

    __slots__ = ("_digests",)

    def __init__(self, tokens: Iterable[bytes]) -> None:
        self._digests = tuple(hashlib.sha256(token).digest() for token in tokens)

    def matches(self, candidate: bytes) -> bool:
        digest = hashlib.sha256(candidate).digest()
        return any(hmac.compare_digest(digest, known) for known in self._digests)


def decode_signature(text: str, encoding: Encoding, size: int) -> bytes | None:
    """The raw signature, or None when ``text`` is not ``size`` bytes in ``encoding``."""
    try:
        raw = binascii.a2b_hex(text) if encoding == "hex" else base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size else None


def header_value(request: WebhookRequest, names: Sequence[str], missing: Reason, malformed: Reason) -> str:
    """The first of ``names`` present (stripped), refused when absent, empty or oversized."""
    for name in names:
        value = request.headers.get(name)
        if value is not None:
            break
    else:
        raise Refused(missing, f"the {names[0]} header is missing")
    value = value.strip()
    if not value:
        raise Refused(missing, f"the {name} header is empty")
    if len(value) > MAX_HEADER_CHARS:
        raise Refused(malformed, f"the {name} header is longer than {MAX_HEADER_CHARS} characters")
    return value


def signed_bytes(value: str, name: str) -> bytes:
    """A header value back as the bytes the sender signed (headers arrive latin-1 decoded)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        raise Refused(Reason.MALFORMED_SIGNATURE, f"the {name} header is not latin-1 text") from None


_UNIX_SECONDS = re.compile(r"[0-9]{1,12}")
_UNIX_MILLISECONDS = re.compile(r"[0-9]{1,15}")


def parse_timestamp(text: str, timestamp_format: TimestampFormat) -> float | None:
    """Unix seconds from ``text`` in ``timestamp_format`` (ISO 8601 without a zone is UTC)."""
    if timestamp_format == "unix":
        return float(text) if _UNIX_SECONDS.fullmatch(text) else None
    if timestamp_format == "unix_ms":
        return int(text) / 1000 if _UNIX_MILLISECONDS.fullmatch(text) else None
    if len(text) > 64:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


class Timestamp:
    """A request's timestamp header: read and parsed before the signature is checked (it is part of
    what was signed), held to the tolerance only after, so ``stale_timestamp`` means authentic but
    late (a replay or a clock off) rather than forged."""

    __slots__ = ("name", "seconds", "text")

    def __init__(self, text: str, name: str, formats: Sequence[TimestampFormat] = ("unix",)) -> None:
        for timestamp_format in formats:
            seconds = parse_timestamp(text, timestamp_format)
            if seconds is not None:
                break
        else:
            described = " or ".join(_FORMAT_NAMES[f] for f in formats)
            raise Refused(Reason.MALFORMED_TIMESTAMP, f"the {name} value is not {described}")
        self.text, self.name, self.seconds = text, name, seconds

    @classmethod
    def from_header(
        cls, request: WebhookRequest, name: str, formats: Sequence[TimestampFormat] = ("unix",)
    ) -> Timestamp:
        text = header_value(request, (name,), Reason.MISSING_TIMESTAMP, Reason.MALFORMED_TIMESTAMP)
        return cls(text, name, formats)

    def require_within(self, tolerance: float, now: float) -> None:
        if self.seconds < now - tolerance:
            raise Refused(Reason.STALE_TIMESTAMP, f"{self.name} is older than the {tolerance:g} s tolerance")
        if self.seconds > now + tolerance:
            raise Refused(Reason.STALE_TIMESTAMP, f"{self.name} is more than {tolerance:g} s in the future")


_FORMAT_NAMES = {"unix": "unix seconds", "unix_ms": "unix milliseconds", "iso8601": "an ISO 8601 time"}


class SenderAllowlist:
    __slots__ = ("_networks",)

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self._networks = tuple(networks)

    def admits(self, client_ip: str) -> bool:
        return address_in(client_ip, self._networks)


class BodyJson:
    """The body parsed as JSON on first use (only after it was verified); fields of a body that is
    not a JSON object are absent."""

    __slots__ = ("_body", "_parsed", "_value")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._parsed = False
        self._value: object = None

    def field(self, path: Sequence[str]) -> object:
        if not self._parsed:
            self._parsed = True
            try:
                self._value = orjson.loads(self._body)
            except orjson.JSONDecodeError:
                self._value = None
        value = self._value
        for key in path:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value


FieldSource = Callable[[WebhookRequest, BodyJson], str | None]
"""Where an event's id or type is read from; None when the request does not carry it."""


def from_header(name: str) -> FieldSource:
    return lambda request, _body: request.headers.get(name) or None


def from_json(path: str) -> FieldSource:
    keys = tuple(path.split("."))

    def read(_request: WebhookRequest, body: BodyJson) -> str | None:
        value = body.field(keys)
        if isinstance(value, str):
            return value or None
        # ShipX ids are numbers; a boolean is not an id.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else None

    return read


def first_of(*sources: FieldSource) -> FieldSource:
    def read(request: WebhookRequest, body: BodyJson) -> str | None:
        for source in sources:
            if (value := source(request, body)) is not None:
                return value
        return None

    return read


def joined(*sources: FieldSource) -> FieldSource:
    """A composite key: every part present, joined by ``:``; else None."""

    def read(request: WebhookRequest, body: BodyJson) -> str | None:
        values = []
        for source in sources:
            value = source(request, body)
            if value is None:
                return None
            values.append(value)
        return ":".join(values)

    return read


def _configured_source(header: str | None, json_path: str | None) -> FieldSource | None:
    sources = [from_header(header)] if header else []
    if json_path:
        sources.append(from_json(json_path))
    return first_of(*sources) if sources else None


def _printable(text: str) -> bool:
    return text.isascii() and text.isprintable()


def _bounded_id(event_id: str | None) -> str | None:
    """The id as stored and sent on in headers: a long or unprintable one is replaced by its hash."""
    if event_id is None or (len(event_id) <= MAX_EVENT_ID_CHARS and _printable(event_id)):
        return event_id
    return "sha256:" + hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).hexdigest()


def _bounded_type(event_type: str | None) -> str | None:
    """A type goes into a header too: one that is long or unprintable is dropped, not sent."""
    if event_type is None or (len(event_type) <= MAX_EVENT_ID_CHARS and _printable(event_type)):
        return event_type
    return None


class SchemeVerifier(ABC):
    """The steps every scheme shares: the sender allowlist, the scheme's own check, then the
    event's id and type (a config's overrides win over the preset's defaults)."""

    credential_headers: frozenset[str] = frozenset()

    def __init__(
        self, config: SchemeBase, event_id: FieldSource | None = None, event_type: FieldSource | None = None
    ) -> None:
        self._senders = SenderAllowlist(config.allowed_cidrs) if config.allowed_cidrs is not None else None
        self._event_id = _configured_source(config.id_header, config.id_json_path) or event_id
        self._event_type = _configured_source(config.type_header, config.type_json_path) or event_type

    def verify(self, request: WebhookRequest) -> Verdict:
        try:
            if self._senders is not None and not self._senders.admits(request.client_ip):
                return Verdict(False, Reason.SENDER_NOT_ALLOWED, "the sender is not in allowed_cidrs")
            body = BodyJson(request.body)
            return self.check(request, body) or Verdict(
                True,
                Reason.OK,
                event_id=_bounded_id(self._event_id(request, body)) if self._event_id else None,
                event_type=_bounded_type(self._event_type(request, body)) if self._event_type else None,
            )
        except Refused as refused:
            return Verdict(False, refused.reason, refused.message)
        except Exception:
            # A bug must refuse the request, never accept it nor crash the ingest path.
            logger.exception("webhook verification failed unexpectedly (%s)", type(self).__name__)
            return Verdict(False, Reason.VERIFICATION_ERROR, "the request could not be verified")

    @abstractmethod
    def check(self, request: WebhookRequest, body: BodyJson) -> Verdict | None:
        """None when the request is authentic; raises Refused when it is not; returns a handshake
        Verdict when the scheme answers the request itself."""


def handshake(status: int, body: bytes, content_type: bytes) -> Verdict:
    return Verdict(True, Reason.HANDSHAKE, answer=(status, body, content_type))
