"""The `security-headers` policy: the browser security fields on every response of a route.

Strict-Transport-Security (RFC 6797), X-Content-Type-Options, X-Frame-Options (RFC 7034),
Referrer-Policy, Content-Security-Policy and Permissions-Policy, each set or turned off
(``null`` or ``false``). The defaults are what the Django gateway of the Pactown deployments
sends with its settings (``SECURE_CONTENT_TYPE_NOSNIFF = True``, ``X_FRAME_OPTIONS = 'DENY'``,
and Django's default ``SECURE_REFERRER_POLICY``, ``same-origin``); HSTS is off there
(``SECURE_HSTS_SECONDS`` unset) and here, as a browser keeps it for its whole ``max_age``.

The fields go on every response the route gives: the upstream's and the gateway's own (401,
429, 502, 504...), through the response phase. A field the response already has is kept unless
``override`` is true. The policy's response hook runs before that of `headers` (order 5100 >
5000; response hooks run in reverse order), so a route's explicit `headers` edits win.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import Field, field_validator, model_validator

from apigate.config.headernames import check_header_value
from apigate.config.units import Duration
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.registry import register
from apigate.policies.security_headers.hotpath import SecurityFields

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

ONE_YEAR: Final = 365 * 86400
# The Referrer-Policy tokens (W3C Referrer Policy §3); a comma-separated list names fallbacks.
REFERRER_POLICIES: Final = frozenset(
    {
        "no-referrer",
        "no-referrer-when-downgrade",
        "same-origin",
        "origin",
        "strict-origin",
        "origin-when-cross-origin",
        "strict-origin-when-cross-origin",
        "unsafe-url",
    }
)


def _off(value: Any) -> Any:
    """``false`` turns a field off, as ``null`` does."""
    return None if value is False else value


class HstsConfig(PolicyConfig):
    max_age: Duration = Field(default=ONE_YEAR, description="seconds browsers keep to HTTPS (or 1y as 365d)")
    include_subdomains: bool = False
    preload: bool = Field(default=False, description="ask to be in the browsers' preload lists")

    @model_validator(mode="after")
    def _preload_needs(self) -> HstsConfig:
        # What the preload lists require of the field (hstspreload.org).
        if self.preload and (not self.include_subdomains or self.max_age < ONE_YEAR):
            raise ValueError("preload needs include_subdomains: true and a max_age of at least a year (365d)")
        return self

    def value(self) -> str:
        text = f"max-age={int(self.max_age)}"
        if self.include_subdomains:
            text += "; includeSubDomains"
        if self.preload:
            text += "; preload"
        return text


class SecurityHeadersConfig(PolicyConfig):
    hsts: HstsConfig | None = Field(default=None, description="Strict-Transport-Security; true: the defaults")
    x_content_type_options: bool | None = Field(default=True, description="X-Content-Type-Options: nosniff")
    x_frame_options: Literal["DENY", "SAMEORIGIN"] | None = "DENY"
    referrer_policy: str | None = "same-origin"
    content_security_policy: str | None = None
    permissions_policy: str | None = None
    override: bool = Field(default=False, description="replace the response's own values (else keep them)")

    @field_validator("hsts", mode="before")
    @classmethod
    def _hsts_switch(cls, value: Any) -> Any:
        return {} if value is True else _off(value)

    @field_validator("x_frame_options", mode="before")
    @classmethod
    def _frame_options(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.upper().startswith("ALLOW-FROM"):
                raise ValueError("ALLOW-FROM is obsolete: use content_security_policy: frame-ancestors ...")
            return value.upper()
        return _off(value)

    _turned_off = field_validator(
        "referrer_policy", "content_security_policy", "permissions_policy", mode="before"
    )(classmethod(lambda cls, value: _off(value)))

    @field_validator("referrer_policy")
    @classmethod
    def _referrer_policy(cls, value: str | None) -> str | None:
        if value is None:
            return None
        tokens = [token.strip().lower() for token in value.split(",")]
        unknown = [token for token in tokens if token not in REFERRER_POLICIES]
        if unknown:
            known = ", ".join(sorted(REFERRER_POLICIES))
            raise ValueError(f"unknown referrer policy {unknown[0]!r} (known: {known})")
        return ", ".join(tokens)

    @field_validator("content_security_policy", "permissions_policy")
    @classmethod
    def _policy_text(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("cannot be empty: use null (or false) to leave the field out")
        return check_header_value(value.strip())

    def fields(self) -> list[tuple[bytes, bytes]]:
        """The configured fields, as lowercase names and values."""
        values = {
            b"strict-transport-security": self.hsts.value() if self.hsts is not None else None,
            b"x-content-type-options": "nosniff" if self.x_content_type_options else None,
            b"x-frame-options": self.x_frame_options,
            b"referrer-policy": self.referrer_policy,
            b"content-security-policy": self.content_security_policy,
            b"permissions-policy": self.permissions_policy,
        }
        return [(name, value.encode()) for name, value in values.items() if value is not None]


@register
class SecurityHeadersPolicy(Policy[SecurityHeadersConfig]):
    name = "security-headers"
    order = 5100  # its response hook runs before that of `headers` (5000): explicit edits win
    phases = frozenset({"response"})

    def prepare(self) -> None:
        self.fields = SecurityFields(self.config.fields(), self.config.override)
        if not self.fields.fields:
            self.phases = frozenset()  # every field turned off: nothing to do
        self.engine_hooks = {"response": self.fields.on_response}

    # What the compiled hook does, for callers other than the engine.
    def on_response(self, exchange: Exchange) -> None:
        self.fields.on_response(exchange)
