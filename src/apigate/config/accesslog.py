"""The ``access_log:`` section: one JSON line per finished exchange, where it goes, how files
rotate, which fields a line has, how successes are sampled and what is never written.

The observer that writes it is ``observe/accesslog/``; this module only validates.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import Field, field_validator, model_validator

from apigate.config.headernames import HEADER_NAME
from apigate.config.units import ByteSize, Duration, parse_duration
from apigate.config.validators import Strict

# Every field a line may have, in the order a line has them: those every line has, then those
# written only when they have a value (unless omit_empty is off).
FIELDS: Final = (
    "time",
    "request_id",
    "trace_id",
    "client_ip",
    "method",
    "path",
    "status",
    "duration_ms",
    "bytes_in",
    "bytes_out",
    "attempts",
    "route",
    "upstream",
    "upstream_ms",
    "consumer",
    "tenant",
    "key_id",
    "user_id",
    "limited",
    "cache",
    "tried",
    "error",
)

# Query parameters and listed headers whose names contain one of these (case-insensitive) have
# their values redacted.
SECRET_NAME_PARTS: Final = (
    "key",
    "token",
    "secret",
    "password",
    "passwd",
    "pwd",
    "signature",
    "sig",
    "hmac",
    "auth",
    "credential",
    "session",
    "code",
)
# Request headers whose values are never written, whatever ``headers`` lists.
CREDENTIAL_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key", "x-auth-token"}
)
PERIODS: Final = {"hourly": 3600.0, "daily": 86400.0}


def _period(value: Any) -> Any:
    """``hourly``, ``daily`` or a duration (``30m``, ``6h``), as seconds."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in PERIODS:
        return PERIODS[value.strip().lower()]
    try:
        return parse_duration(value)
    except ValueError:
        raise ValueError("expected hourly, daily or a duration such as 6h or 30m") from None


class RotateConfig(Strict):
    max_bytes: ByteSize | None = Field(default=None, description="rotate before the file would exceed this")
    every: Annotated[float, Field(ge=1.0)] | None = Field(
        default=None, description="hourly, daily or a duration: rotate at each UTC boundary of it"
    )
    keep: int = Field(default=7, ge=1, le=10000, description="rotated files kept (the oldest are deleted)")

    _every = field_validator("every", mode="before")(classmethod(lambda cls, v: _period(v)))

    @field_validator("max_bytes")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1024:
            raise ValueError("must be at least 1KB")
        return value

    @model_validator(mode="after")
    def _something_rotates(self) -> RotateConfig:
        if self.max_bytes is None and self.every is None:
            raise ValueError("give max_bytes, every or both")
        return self


class AccessLogConfig(Strict):
    enabled: bool = Field(default=True, description="on when the section is present, unless false")
    output: str = Field(default="stdout", description="stdout, or the path of a file lines are appended to")
    rotate: RotateConfig | None = None
    fields: tuple[str, ...] = FIELDS
    omit_empty: bool = Field(default=True, description="leave out fields without a value (else null)")
    headers: tuple[str, ...] = Field(default=(), description="request headers a line carries (under headers)")
    query: Literal["drop", "keep"] = "drop"
    redact_params: tuple[str, ...] = Field(
        default=(), description="more secret-looking names (substrings) of query parameters and headers"
    )
    sensitive_headers: tuple[str, ...] = Field(
        default=(), description="more request headers whose values are never written"
    )
    sample: float = Field(default=1.0, ge=0.0, le=1.0, description="ratio of successes written")
    buffer: int = Field(default=10_000, ge=1, le=10_000_000, description="lines queued before dropping")
    flush_interval: Duration = Field(default=1.0, gt=0.0, le=60.0)

    @field_validator("output")
    @classmethod
    def _output(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be stdout or a file path")
        if "\x00" in value:
            raise ValueError("a file path cannot contain a NUL character")
        return value

    @field_validator("fields")
    @classmethod
    def _fields(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if not names:
            raise ValueError("list at least one field")
        for name in names:
            if name not in FIELDS:
                raise ValueError(f"{name!r} is not a field; the fields are {', '.join(FIELDS)}")
        if len(set(names)) != len(names):
            raise ValueError("a field is listed twice")
        return names

    @field_validator("headers", "sensitive_headers")
    @classmethod
    def _header_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if not HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
        return tuple(name.lower() for name in names)

    @field_validator("redact_params")
    @classmethod
    def _params(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if any(not name for name in names):
            raise ValueError("a parameter name cannot be empty")
        return tuple(name.lower() for name in names)

    @model_validator(mode="after")
    def _consistent(self) -> AccessLogConfig:
        if self.rotate is not None and self.output == "stdout":
            raise ValueError("rotate needs a file output, not stdout")
        return self
