"""The ``poll:`` block of a source whose provider pushes nothing: the gateway fetches its events.

```yaml
sources:
  allegro-orders:
    poll:
      type: allegro
      client_id: ${ALLEGRO_CLIENT_ID}
      client_secret: ${ALLEGRO_CLIENT_SECRET}
      refresh_token: ${ALLEGRO_REFRESH_TOKEN}   # the first one; rotated ones are kept in the store
      interval: 30s
      event_types: [READY_FOR_PROCESSING, BUYER_CANCELLED]
    destinations: [orders]
```
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from apigate.config.units import Duration
from apigate.config.validators import check_http_url

_EVENT_TYPE = re.compile(r"^[A-Z][A-Z0-9_]{0,99}$")


class AllegroPollConfig(BaseModel):
    """Allegro's order event journal (``GET /order/events``) read with the merchant's OAuth token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["allegro"]
    api_url: str = "https://api.allegro.pl"
    token_url: str = "https://allegro.pl/auth/oauth/token"
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    refresh_token: SecretStr
    """The merchant's refresh token from the authorization. Allegro returns a new one on every
    refresh; the newest is kept in the store and used from then on, until this value changes."""
    redirect_uri: str | None = None
    """Sent with each refresh when set (Allegro's examples pass the app's redirect URI)."""
    interval: Duration = Field(default=30.0, gt=0, le=3600)
    """Pause between polls once the journal is read to its end."""
    event_types: list[str] | None = Field(default=None, min_length=1)
    """Only these types (BOUGHT, FILLED_IN, READY_FOR_PROCESSING, BUYER_CANCELLED, ...); unset: all."""
    page_size: int = Field(default=100, ge=1, le=1000)
    timeout: Duration = Field(default=10.0, gt=0, le=120)

    @field_validator("api_url", "token_url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        return check_http_url(url.rstrip("/"))

    @field_validator("event_types")
    @classmethod
    def _check_event_types(cls, types: list[str] | None) -> list[str] | None:
        for event_type in types or ():
            if not _EVENT_TYPE.match(event_type):
                raise ValueError(f"{event_type!r} is not an Allegro event type such as READY_FOR_PROCESSING")
        return types


# One kind of polled provider so far; another joins as a union discriminated by ``type``.
PollConfig = AllegroPollConfig
