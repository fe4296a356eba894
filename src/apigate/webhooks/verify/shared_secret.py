"""Senders that present a shared secret instead of signing: a token header, or HTTP Basic.

Neither binds the body nor a time, so they are only as good as TLS and de-duplication.
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from pydantic import Field, field_validator

from apigate.webhooks.verify.common import (
    BodyJson,
    HeaderName,
    Refused,
    SchemeBase,
    SchemeVerifier,
    Secrets,
    TokenSet,
    header_value,
    secret_bytes,
    signed_bytes,
)
from apigate.webhooks.verify.model import Reason, Verdict, WebhookRequest

BASIC_PREFIX = "basic "


class TokenConfig(SchemeBase):
    scheme: Literal["token"]
    secrets: Secrets
    header: HeaderName = "x-webhook-token"
    prefix: str = Field(default="", max_length=64, description='text before the token, e.g. "Bearer "')

    def build(self) -> TokenVerifier:
        return TokenVerifier(self)


class TokenVerifier(SchemeVerifier):
    def __init__(self, config: TokenConfig) -> None:
        super().__init__(config)
        self._tokens = TokenSet(secret_bytes(config.secrets))
        self._header = config.header
        self.credential_headers = frozenset({config.header.lower()})
        self._prefix = config.prefix.strip()

    def check(self, request: WebhookRequest, body: BodyJson) -> Verdict | None:
        value = header_value(request, (self._header,), Reason.MISSING_TOKEN, Reason.BAD_TOKEN)
        if not value.startswith(self._prefix):
            raise Refused(Reason.BAD_TOKEN, f"the {self._header} value does not start with {self._prefix!r}")
        token = value[len(self._prefix) :].strip()
        if not self._tokens.matches(signed_bytes(token, self._header)):
            raise Refused(Reason.BAD_TOKEN, f"the {self._header} token matches no configured token")
        return None


class BasicConfig(SchemeBase):
    """HTTP Basic; ``secrets`` are the passwords accepted for ``username``."""

    scheme: Literal["basic"]
    username: str = Field(min_length=1, max_length=200)
    secrets: Secrets

    @field_validator("username")
    @classmethod
    def _no_colon(cls, username: str) -> str:
        if ":" in username:
            raise ValueError("a Basic username cannot contain ':'")
        return username

    def build(self) -> BasicVerifier:
        return BasicVerifier(self)


class BasicVerifier(SchemeVerifier):
    credential_headers = frozenset({"authorization"})

    def __init__(self, config: BasicConfig) -> None:
        super().__init__(config)
        user = config.username.encode("utf-8")
        self._credentials = TokenSet(user + b":" + password for password in secret_bytes(config.secrets))

    def check(self, request: WebhookRequest, body: BodyJson) -> Verdict | None:
        value = header_value(
            request, ("authorization",), Reason.MISSING_CREDENTIALS, Reason.MALFORMED_CREDENTIALS
        )
        if value[: len(BASIC_PREFIX)].lower() != BASIC_PREFIX:
            raise Refused(Reason.MISSING_CREDENTIALS, "the authorization header is not Basic")
        try:
            credentials = base64.b64decode(value[len(BASIC_PREFIX) :].strip(), validate=True)
        except (binascii.Error, ValueError):
            raise Refused(Reason.MALFORMED_CREDENTIALS, "the Basic credentials are not base64") from None
        if not self._credentials.matches(credentials):
            raise Refused(Reason.BAD_CREDENTIALS, "the Basic username or password is wrong")
        return None
