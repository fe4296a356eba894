"""The ``webhooks:`` section: sources that receive events, destinations that get them delivered.

```yaml
webhooks:
  path: /webhooks                 # sources answer at {path}/{source name}
  signing_secret: ${APIGATE_WEBHOOK_SECRET:-}   # whsec_...; empty: generated once, kept in the store
  sources:
    stripe:
      verify: {scheme: stripe, secret: ${STRIPE_WEBHOOK_SECRET}}
      destinations: [billing]     # or [{name: billing, event_types: ["charge.*"], fifo: true}]
      mode: async                 # async: commit, answer 2xx, deliver later; sync: forward and answer
      dedupe: {retention: 7d}
    allegro-orders:
      poll: {type: allegro, client_id: ..., client_secret: ..., refresh_token: ...}   # webhooks/pollers
      destinations: [orders]
  destinations:
    billing:
      type: http
      url: http://billing:8080/hooks/stripe
      timeout: 10s
      concurrency: 10
      rate_limit: 50/s
      retry: {schedule: [0, 5s, 5m, 30m, 2h, 5h, 10h, 10h], jitter: 0.2}
      disable_after: 5d           # every attempt failing this long disables it (0: never)
    orders:
      type: redis_stream          # XADD to a stream (destinations/redis_streams.py)
      url: redis://redis:6379/0
      stream: orders
```
"""

from __future__ import annotations

import base64
import fnmatch
import re
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    SecretStr,
    Tag,
    field_validator,
    model_validator,
)

from apigate.config.units import ByteSize, Duration
from apigate.config.validators import Strict, check_http_url
from apigate.webhooks.pollers.config import PollConfig
from apigate.webhooks.verify.schemes import SchemeConfig

# Immediately, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: eight attempts over about 28 hours.
DEFAULT_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_PERIOD = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_RATE_PERIOD |= {"h": 3600.0, "hour": 3600.0}

# The fields every Redis stream entry has (see destinations/redis_streams.py); no header may take one.
ENTRY_FIELDS = frozenset(
    {"webhook-id", "webhook-timestamp", "webhook-signature", "source", "type", "attempt", "body"}
)


def _check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{what} name {name!r} must be letters, digits, '_', '.' or '-' (up to 100)")
    return name


class RetryConfig(Strict):
    schedule: list[Duration] = Field(
        default_factory=lambda: list(DEFAULT_SCHEDULE), min_length=1, max_length=50
    )
    """Delay before each attempt: the first after the event arrives, each next after a failure.
    Its length is the number of attempts; after the last one fails the delivery is dead."""
    jitter: float = Field(default=0.2, ge=0.0, le=1.0)
    """Each delay is scaled by a random factor in [1 - jitter, 1 + jitter] (spreads retry storms)."""


class DeliveryLimits(Strict):
    """What every kind of destination has: how long an attempt takes, how many run at once, retries."""

    timeout: Duration = Field(default=10.0, gt=0)
    concurrency: int = Field(default=10, ge=1, le=1000)
    rate_limit: str | None = Field(default=None, description="at most this many attempts, e.g. 50/s, 600/min")
    retry: RetryConfig = RetryConfig()
    disable_after: Duration = Field(default=5 * 86400.0, ge=0)
    """When every attempt has failed for this long (since the last success), the destination is
    disabled for the whole cluster until ``apigate webhooks destinations enable``; 0: never."""

    @field_validator("rate_limit")
    @classmethod
    def _check_rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value

    @property
    def rate(self) -> tuple[float, float] | None:
        """(attempts, per seconds), or None for no limit."""
        return None if self.rate_limit is None else parse_rate(self.rate_limit)


class HttpDestinationConfig(DeliveryLimits):
    """POST the event to a URL."""

    type: Literal["http"] = "http"
    url: str

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        return check_http_url(url)


class RedisStreamDestinationConfig(DeliveryLimits):
    """XADD the event to a Redis stream; an acknowledged XADD is a delivery (see redis_streams.py)."""

    type: Literal["redis_stream"]
    url: str = Field(description="redis://[:password@]host:port/db, rediss:// for TLS")
    stream: str = Field(min_length=1, max_length=200)
    maxlen: int | None = Field(default=None, ge=1)
    """Trim the stream to about this many entries on each XADD (MAXLEN ~); unset: never trimmed."""
    headers: list[str] = Field(default_factory=lambda: ["content-type"])
    """Request headers copied into each entry, as fields under their lower-case names."""
    dedupe_window: Duration = Field(default=600.0, ge=0)
    """An event id published within this window is not added again (0: no check); see the docs."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return url

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, names: list[str]) -> list[str]:
        lowered = [name.lower() for name in names]
        for name in lowered:
            if name in ENTRY_FIELDS:
                raise ValueError(f"{name!r} is a field every entry has already; it cannot be a header field")
        return lowered


def _destination_type(value: Any) -> str:
    # ``type`` may be left out for HTTP destinations, as before other kinds existed.
    return value.get("type", "http") if isinstance(value, dict) else getattr(value, "type", "http")


DestinationConfig = Annotated[
    Annotated[HttpDestinationConfig, Tag("http")]
    | Annotated[RedisStreamDestinationConfig, Tag("redis_stream")],
    Discriminator(_destination_type),
]


def parse_rate(value: str) -> tuple[float, float]:
    match = _RATE.match(value)
    if not match or float(match.group(1)) <= 0:
        raise ValueError("expected a rate such as 50/s, 600/min or 1000/h")
    return float(match.group(1)), _RATE_PERIOD[match.group(2)]


class SourceDestination(Strict):
    """A destination of a source, optionally only for some event types (shell-style patterns)."""

    name: str
    event_types: list[str] | None = Field(default=None, description='e.g. ["charge.*", "invoice.paid"]')
    fifo: bool = False
    """Deliver the source's events to this destination one at a time, in the order received: a
    failing event holds back the ones behind it until it is delivered or dead."""

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    def wants(self, event_type: str | None) -> bool:
        if self.event_types is None:
            return True
        return event_type is not None and any(fnmatch.fnmatchcase(event_type, p) for p in self.event_types)


class DedupeConfig(Strict):
    retention: Duration = Field(default=7 * 86400.0, gt=0)
    """How long an event (and so its id) is kept after it is done: a repeat within it is acknowledged
    and not delivered again. Events without a provider id are keyed by the SHA-256 of the body."""


class SourceConfig(Strict):
    verify: SchemeConfig | None = None
    """How webhooks pushed to the source are verified; a source has this or ``poll``."""
    poll: PollConfig | None = None
    """The gateway fetches the source's events itself (webhooks/pollers); none are accepted by POST."""
    destinations: list[SourceDestination] = Field(min_length=1)
    mode: Literal["async", "sync"] = "async"
    dedupe: DedupeConfig = DedupeConfig()
    max_body_size: ByteSize = Field(default=1 << 20, ge=1, le=64 << 20)

    @model_validator(mode="after")
    def _sync_forwards_to_one_destination_at_once(self) -> SourceConfig:
        if self.mode == "sync" and len(self.destinations) != 1:
            raise ValueError("mode: sync forwards to exactly one destination (destinations lists more)")
        if self.mode == "sync" and self.destinations[0].fifo:
            raise ValueError("mode: sync forwards each request at once: fifo does not apply")
        return self

    @model_validator(mode="after")
    def _pushed_or_polled(self) -> SourceConfig:
        if (self.verify is None) == (self.poll is None):
            raise ValueError("a source needs one of verify (webhooks are pushed) and poll (fetched)")
        if self.poll is not None and self.mode == "sync":
            raise ValueError("a polled source is async: nobody waits for the handler's answer")
        return self


class WebhooksConfig(Strict):
    path: str = "/webhooks"
    signing_secret: SecretStr | None = None
    """The gateway's own Standard Webhooks key (whsec_ + base64) for the signature on deliveries;
    unset: one is generated once and kept in the store (``apigate webhooks secret`` prints it)."""
    poll_interval: Duration = Field(default=0.5, gt=0, le=60)
    """How often the delivery worker looks for due deliveries it was not told about."""
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    destinations: dict[str, DestinationConfig] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: str) -> str:
        if not path.startswith("/") or path.endswith("/") or any(c in path for c in "{}*?#"):
            raise ValueError("must be a plain path such as /webhooks (leading /, no trailing /)")
        return path

    @field_validator("signing_secret", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("signing_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            signing_key(value.get_secret_value())
        return value

    @field_validator("sources", "destinations")
    @classmethod
    def _check_names(cls, named: dict[str, Any]) -> dict[str, Any]:
        for name in named:
            _check_name(str(name), "a source or destination")
        return named

    @model_validator(mode="after")
    def _destinations_exist(self) -> WebhooksConfig:
        for source_name, source in self.sources.items():
            for index, wanted in enumerate(source.destinations):
                if wanted.name not in self.destinations:
                    raise ValueError(
                        f"sources.{source_name}.destinations[{index}]: no destination named {wanted.name!r}"
                    )
        return self

    @model_validator(mode="after")
    def _sync_sources_forward_over_http(self) -> WebhooksConfig:
        for source_name, source in self.sources.items():
            destination = self.destinations.get(source.destinations[0].name)
            if source.mode == "sync" and destination is not None and destination.type != "http":
                raise ValueError(f"sources.{source_name}: mode: sync forwards to an http destination only")
        return self


def signing_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: the base64 after ``whsec_``."""
    encoded = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise ValueError("signing_secret must be whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("signing_secret must hold at least 16 bytes of key")
    return key
