"""The `hmac-auth` policy: requests signed with a shared secret, in the style of Kong's hmac-auth.

The client sends ``Authorization: hmac username="...", algorithm="hmac-sha256",
headers="date request-line digest", signature="<base64>"``. The signed string is one
``name: value`` line per listed header, joined by ``\\n``; the pseudo-header ``request-line`` is
``METHOD PATH?QUERY HTTP/x.y`` (the target as the gateway received it, after its dot-segment
normalization). ``date`` (or ``x-date``, preferred when both are present) must be signed and
within ``clock_skew`` of the gateway's clock, and a signature is accepted once per window.

The replay window lives in the state backend: per process with ``memory`` (answered without
waiting), cluster-wide with Redis (one round trip). When Redis cannot answer, a signed request
is refused with 503 ``unavailable`` rather than let through unchecked: a replay window that
fails open is no replay protection at all (fail closed, as APISIX's default for Redis-backed
plugins).

With ``validate_body: true`` a ``Digest: SHA-256=<base64>`` (or ``SHA-512=``) header must be
present and signed, and the body must match it (checked on the whole body, which the engine then
buffers: up to 1 MiB, or the route's ``max_body_size`` if lower; over it: 413); a mismatch is
``invalid_digest``. Without ``validate_body``, bodies stream.

Every failure is a 401 with a ``WWW-Authenticate: hmac`` challenge and a JSON
``{"error", "reason", "request_id"}``; an unknown username, an unknown consumer and a wrong
signature give the same ``invalid_signature`` answer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from datetime import UTC
from email.utils import parsedate_to_datetime
from time import time as _time
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from apigate.config.headernames import check_header_name
from apigate.engine.replies import Reply, json_reply
from apigate.policies.authconfig import AuthConfig, check_forwarded_names
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.registry import register
from apigate.policies.services import unavailable
from apigate.state import StateUnavailable

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from apigate.consumers.registry import ConsumerRegistry
    from apigate.engine.exchange import Exchange
    from apigate.state import StateBackend
    from apigate.store.roles.consumers import Consumer

Algorithm = Literal["hmac-sha256", "hmac-sha384", "hmac-sha512"]
_DIGESTS = {"hmac-sha256": hashlib.sha256, "hmac-sha384": hashlib.sha384, "hmac-sha512": hashlib.sha512}
_USERNAME = re.compile(r'^[^"\\\x00-\x1f\x7f]{1,200}$')
# One `name="value"` parameter of the Authorization header, then a comma or the end.
_PARAM = re.compile(rb'[ \t]*([A-Za-z]+)[ \t]*=[ \t]*"([^"\\\x00-\x1f\x7f]*)"[ \t]*(?:,|$)')
_KNOWN_PARAMS = frozenset({b"username", b"algorithm", b"headers", b"signature"})
_MAX_AUTHORIZATION = 8192
_MAX_SIGNED_HEADERS = 50
MIN_SECRET_LENGTH = 16


class HmacCredential(PolicyConfig):
    secret: SecretStr = Field(description=f"shared secret, at least {MIN_SECRET_LENGTH} characters")
    consumer: str = Field(min_length=1, max_length=200, description="id of a consumer (config or store)")

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, secret: SecretStr) -> SecretStr:
        if len(secret.get_secret_value()) < MIN_SECRET_LENGTH:
            raise ValueError(f"secret must be at least {MIN_SECRET_LENGTH} characters")
        return secret


class HmacForwardHeaders(PolicyConfig):
    """Headers set from the consumer for the upstream (null disables one); client-sent ones are removed."""

    consumer_id: str | None = "X-Consumer-ID"
    tenant: str | None = "X-Tenant-ID"
    username: str | None = Field(default=None, description="the credential's username")

    @field_validator("consumer_id", "tenant", "username")
    @classmethod
    def _names(cls, name: str | None) -> str | None:
        return None if name is None else check_header_name(name, "be used here")


class HmacAuthConfig(AuthConfig):
    credentials: dict[str, HmacCredential] = Field(
        default_factory=dict, description="username -> {secret, consumer}"
    )
    algorithms: list[Algorithm] = Field(
        default_factory=lambda: ["hmac-sha256", "hmac-sha384", "hmac-sha512"], min_length=1
    )
    clock_skew: float = Field(default=300.0, gt=0, le=86400, description="seconds")
    enforce_headers: list[str] = Field(default_factory=lambda: ["date", "request-line"])
    validate_body: bool = Field(
        default=False, description="require a signed Digest header and check the body against it"
    )
    hide_credentials: bool = Field(default=True, description="remove Authorization before proxying")
    forward_headers: HmacForwardHeaders = HmacForwardHeaders()

    @field_validator("credentials")
    @classmethod
    def _usernames(cls, credentials: dict[str, HmacCredential]) -> dict[str, HmacCredential]:
        for username in credentials:
            if not _USERNAME.match(username):
                raise ValueError(
                    f"username {username!r} must be 1-200 characters without quotes, "
                    "backslashes or control characters"
                )
        return credentials

    @field_validator("enforce_headers")
    @classmethod
    def _enforced(cls, names: list[str]) -> list[str]:
        out = []
        for name in names:
            if name.lower() != "request-line":
                check_header_name(name, "be signed")
            out.append(name.lower())
        return out

    @model_validator(mode="after")
    def _distinct(self) -> HmacAuthConfig:
        check_forwarded_names(self.forward_headers, "Authorization")
        return self


_DIGEST_ALGORITHMS = {b"sha-256": ("sha256", 32), b"sha-512": ("sha512", 64)}


def _parse_digest(value: bytes | None) -> tuple[str, bytes] | None:
    """``SHA-256=<base64>`` (RFC 3230, as Kong's hmac-auth uses it) → (hashlib name, digest)."""
    if value is None:
        return None
    name, sep, encoded = value.partition(b"=")
    known = _DIGEST_ALGORITHMS.get(name.strip().lower())
    if not sep or known is None:
        return None
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return (known[0], digest) if len(digest) == known[1] else None


class _Denied(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _parse_authorization(value: bytes) -> dict[bytes, bytes] | None:
    """The parameters of an ``hmac`` Authorization value; None if it is not the hmac scheme."""
    scheme, _, rest = value.strip().partition(b" ")
    if scheme.lower() != b"hmac":
        return None
    if len(value) > _MAX_AUTHORIZATION:
        raise _Denied("malformed_authorization", "the Authorization header is too long")
    params: dict[bytes, bytes] = {}
    rest = rest.strip()
    pos = 0
    while pos < len(rest):
        match = _PARAM.match(rest, pos)
        if match is None or match.end() == pos:
            raise _Denied("malformed_authorization", "the Authorization header is malformed")
        name = match.group(1).lower()
        if name in params:
            raise _Denied("malformed_authorization", "an Authorization parameter is repeated")
        if name in _KNOWN_PARAMS:
            params[name] = match.group(2)
        pos = match.end()
    if rest.endswith(b","):
        raise _Denied("malformed_authorization", "the Authorization header is malformed")
    if not params.get(b"username") or not params.get(b"signature"):
        raise _Denied("malformed_authorization", "username and signature are required")
    return params


@register
class HmacAuthPolicy(Policy[HmacAuthConfig]):
    name = "hmac-auth"
    order = 1000
    phases = frozenset({"request", "body"})
    needs = frozenset({"consumers", "state"})

    def prepare(self) -> None:
        config = self.config
        self.credentials = {
            name.encode(): (cred.secret.get_secret_value().encode(), cred.consumer)
            for name, cred in config.credentials.items()
        }
        self.algorithms = frozenset(config.algorithms)
        self.skew = float(config.clock_skew)
        enforced = list(dict.fromkeys(config.enforce_headers))
        if config.validate_body and "digest" not in enforced:
            enforced.append("digest")
        self.enforced = enforced
        self.validate_body = config.validate_body
        if not config.validate_body:
            self.phases = frozenset({"request"})  # bodies stream
        self.hide = config.hide_credentials
        self.hmac_required = config.required
        forward = config.forward_headers
        self.h_consumer = forward.consumer_id.lower().encode() if forward.consumer_id else None
        self.h_tenant = forward.tenant.lower().encode() if forward.tenant else None
        self.h_username = forward.username.lower().encode() if forward.username else None
        self.forwarded = frozenset(h for h in (self.h_consumer, self.h_tenant, self.h_username) if h)
        # Compared against when the username is unknown, so that case costs the same HMAC.
        self._dummy_secret = b"\x00" * 32
        signed = " ".join(enforced)
        algorithms = " ".join(a for a in _DIGESTS if a in self.algorithms)
        self.challenge = (
            f'hmac realm="{config.realm}", headers="{signed}", algorithms="{algorithms}"'.encode()
        )

    # -- answers --------------------------------------------------------------------------------
    def _deny(self, exchange: Exchange, reason: str, message: str) -> Reply:
        payload = {"error": message, "reason": reason, "request_id": exchange.request_id}
        return json_reply(401, payload, [(b"www-authenticate", self.challenge)])

    # -- the request hook --------------------------------------------------------------------------
    def on_request(self, exchange: Exchange) -> Reply | Awaitable[Reply | None] | None:
        authorization = exchange.header(b"authorization")
        try:
            params = _parse_authorization(authorization) if authorization is not None else None
        except _Denied as denied:
            return self._deny(exchange, denied.reason, denied.message)
        if params is None:
            if self.hmac_required:
                return self._deny(exchange, "missing_signature", "a signed request is required")
            if self.forwarded:  # the upstream trusts these: a client may not send them
                exchange.headers = [p for p in exchange.headers if p[0] not in self.forwarded]
            return None
        registry = self.services.consumers
        state = self.services.state
        if registry is None or state is None:
            return unavailable(exchange, "the consumer registry is not available, try again")
        try:
            return self._verify(exchange, params, registry, state)
        except _Denied as denied:
            return self._deny(exchange, denied.reason, denied.message)

    def _verify(
        self, exchange: Exchange, params: dict[bytes, bytes], registry: ConsumerRegistry, state: StateBackend
    ) -> Reply | Awaitable[Reply | None] | None:
        algorithm = params.get(b"algorithm", b"hmac-sha256").decode("latin-1").lower()
        if algorithm not in self.algorithms:
            raise _Denied("unsupported_algorithm", "the signature algorithm is not accepted here")
        try:
            signature = base64.b64decode(params[b"signature"], validate=True)
        except (binascii.Error, ValueError):
            raise _Denied("malformed_authorization", "the signature is not valid base64") from None
        signed = params.get(b"headers", b"date").decode("latin-1").lower().split()
        if not signed or len(signed) > _MAX_SIGNED_HEADERS:
            raise _Denied("malformed_authorization", "the list of signed headers is empty or too long")
        signed_set = set(signed)
        for name in self.enforced:
            if name not in signed_set and not (name == "date" and "x-date" in signed_set):
                raise _Denied("unsigned_header", f"the {name} header must be signed")

        # The date: x-date wins (browsers cannot set Date), and the one used must be signed.
        date_name = b"x-date" if exchange.header(b"x-date") is not None else b"date"
        date_value = exchange.header(date_name)
        if date_value is None:
            raise _Denied("clock_skew", "a Date or X-Date header is required")
        if date_name.decode() not in signed_set:
            raise _Denied("unsigned_header", f"the {date_name.decode()} header must be signed")
        try:
            parsed = parsedate_to_datetime(date_value.decode("latin-1"))
            if parsed.tzinfo is None:  # "-0000": UTC without a claim about the local zone
                parsed = parsed.replace(tzinfo=UTC)
            date = parsed.timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            raise _Denied("clock_skew", "the Date header is not an HTTP date") from None
        now = _time()
        if abs(now - date) > self.skew:
            raise _Denied("clock_skew", f"the request date is over {self.skew:g}s from the gateway's clock")
        if self.validate_body:
            digest = exchange.header(b"digest")
            if digest is None:
                raise _Denied("unsigned_header", "a signed Digest header is required")
            if _parse_digest(digest) is None:
                raise _Denied(
                    "invalid_digest", "the Digest header must be SHA-256=<base64> or SHA-512=<base64>"
                )

        # The string to sign, one line per listed header.
        lines: list[bytes] = []
        for name in signed:
            if name == "request-line":
                target = exchange.raw_path + (b"?" + exchange.query if exchange.query else b"")
                lines.append(b"%s %s HTTP/%s" % (exchange.method.encode(), target, exchange.version.encode()))
                continue
            key = name.encode("latin-1")
            values = [value for header, value in exchange.headers if header == key]
            if not values:
                raise _Denied("invalid_signature", "the signature is not valid")
            lines.append(key + b": " + b", ".join(values))
        message = b"\n".join(lines)

        username = params[b"username"]
        credential = self.credentials.get(username)
        secret = credential[0] if credential is not None else self._dummy_secret
        expected = hmac.new(secret, message, _DIGESTS[algorithm]).digest()
        valid = hmac.compare_digest(expected, signature)
        consumer = registry.consumer(credential[1]) if credential is not None else None
        if not valid or consumer is None or consumer.disabled:
            raise _Denied("invalid_signature", "the signature is not valid")

        # Remembered until the date leaves the window: a replay after that fails the skew check.
        replay_key = "hmac-replay:" + hashlib.sha256(username + b"\x00" + signature).hexdigest()
        window = max(date + self.skew - now, 0.001)
        fresh = state.add_if_absent_nowait(replay_key, window)
        if fresh is None:
            return self._claim_shared(exchange, state, replay_key, window, consumer, username)
        if not fresh:
            raise _Denied("replayed", "this signature was already used")
        self._accept(exchange, consumer, username)
        return None

    async def _claim_shared(
        self,
        exchange: Exchange,
        state: StateBackend,
        key: str,
        window: float,
        consumer: Consumer,
        username: bytes,
    ) -> Reply | None:
        try:
            fresh = await state.add_if_absent(key, window)
        except StateUnavailable:
            return unavailable(exchange, "the replay window is not available, try again")  # fail closed
        if not fresh:
            return self._deny(exchange, "replayed", "this signature was already used")
        self._accept(exchange, consumer, username)
        return None

    def on_body(self, exchange: Exchange, body: bytes) -> Reply | None:
        """With validate_body: the body must be the one the signed Digest header describes."""
        claimed = _parse_digest(exchange.header(b"digest"))
        if claimed is None:
            # Only reached when on_request let an unsigned request through (required: false).
            return None
        algorithm, expected = claimed
        if not hmac.compare_digest(hashlib.new(algorithm, body).digest(), expected):
            return self._deny(exchange, "invalid_digest", "the body does not match the Digest header")
        return None

    def _accept(self, exchange: Exchange, consumer: Consumer, username: bytes) -> None:
        # Drop Authorization (if hidden) and client-sent forwarded headers, then set ours.
        drop = self.forwarded | {b"authorization"} if self.hide else self.forwarded
        headers = [pair for pair in exchange.headers if pair[0] not in drop]
        for name, value in (
            (self.h_consumer, consumer.id),
            (self.h_tenant, consumer.tenant),
            (self.h_username, username.decode("latin-1")),
        ):
            if name is not None and value and value.isascii() and value.isprintable():
                headers.append((name, value.encode()))
        exchange.headers = headers
        exchange.consumer = consumer
        exchange.tenant = consumer.tenant
