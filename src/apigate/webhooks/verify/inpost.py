"""InPost, two presets.

``inpost`` (one preset for both signed forms; they share the header name, which is
case-insensitive, so the value's shape tells them apart):

- ``X-InPost-Signature: sha256=<hex>``: the Pactown gateway's scheme, the HMAC-SHA256 of the body;
- ``x-inpost-signature: <base64>``: the InPost Group API's HMAC-SHA256 of the body or, when an
  ``x-inpost-timestamp`` header is present, of ``"{x-inpost-timestamp}.{body}"``, the timestamp
  (unix seconds or ISO 8601) within the tolerance.

``inpost_shipx``: ShipX (Manager Paczek) signs nothing. Its sender range is InPost's published
91.216.25.0/24 (overridable with ``allowed_cidrs``), and the webhook URL saved in ShipX carries a
secret token, in a query parameter (``?token=…`` by default) or as the URL's last path segment.
Saving the URL makes InPost send a ``GET`` to it, answered 200 here (after the same sender and
token checks) without becoming an event. The event id is the composite
``{event}:{payload.shipment_id}[:{payload.status}]:{event_ts}`` of ShipX's body
(``{"event_ts": …, "event": "shipment_status_changed", "payload": {"shipment_id": …,
"status": …}}``); the type is ``event``.
"""

from __future__ import annotations

from ipaddress import ip_network
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import Field, IPvAnyNetwork

from apigate.webhooks.verify.common import (
    BodyJson,
    HmacKeys,
    Refused,
    SchemeBase,
    SchemeVerifier,
    Secrets,
    TokenSet,
    Tolerance,
    first_of,
    from_json,
    handshake,
    joined,
    secret_bytes,
)
from apigate.webhooks.verify.model import Reason, Verdict, WebhookRequest
from apigate.webhooks.verify.signed import HmacRule, compile_template

HEADER = "x-inpost-signature"
TIMESTAMP_HEADER = "x-inpost-timestamp"
HEX_PREFIX = "sha256="  # the Pactown gateway's form; the InPost Group API's has none
SHIPX_SENDER_RANGE = "91.216.25.0/24"


class InpostConfig(SchemeBase):
    """No event id unless configured (neither form names one)."""

    scheme: Literal["inpost"]
    secrets: Secrets
    tolerance: Tolerance = 300.0

    def build(self) -> InpostVerifier:
        return InpostVerifier(self)


class InpostVerifier(SchemeVerifier):
    def __init__(self, config: InpostConfig) -> None:
        super().__init__(config)
        self._keys = HmacKeys(secret_bytes(config.secrets), "sha256")
        self._hex = HmacRule(headers=(HEADER,), prefix=HEX_PREFIX)
        self._group = HmacRule(headers=(HEADER,), encoding="base64")
        self._group_timestamped = HmacRule(
            headers=(HEADER,),
            encoding="base64",
            template=compile_template("{timestamp}.{body}"),
            timestamp_header=TIMESTAMP_HEADER,
            timestamp_formats=("unix", "iso8601"),
            tolerance=config.tolerance,
        )

    def check(self, request: WebhookRequest, body: BodyJson) -> Verdict | None:
        if request.headers.get(HEADER, "").lstrip().startswith(HEX_PREFIX):
            rule = self._hex
        elif TIMESTAMP_HEADER in request.headers:
            rule = self._group_timestamped
        else:
            rule = self._group
        rule.verify(request, self._keys)
        return None


class InpostShipxConfig(SchemeBase):
    scheme: Literal["inpost_shipx"]
    secrets: Secrets = Field(description="tokens accepted in the webhook URL (several during rotation)")
    token_in: Literal["query", "path"] = "query"
    token_param: str = Field(default="token", min_length=1, description="query parameter of the token")
    allowed_cidrs: list[IPvAnyNetwork] | None = Field(
        default_factory=lambda: [ip_network(SHIPX_SENDER_RANGE)],
        description="InPost's published ShipX sender range unless overridden",
    )

    def build(self) -> InpostShipxVerifier:
        return InpostShipxVerifier(self)


def url_token(url: str, token_in: Literal["query", "path"], param: str) -> str | None:
    parts = urlsplit(url)
    if token_in == "path":
        return unquote(parts.path.rstrip("/").rpartition("/")[2], errors="strict") or None
    return next((value for name, value in parse_qsl(parts.query, errors="strict") if name == param), None)


class InpostShipxVerifier(SchemeVerifier):
    def __init__(self, config: InpostShipxConfig) -> None:
        event = from_json("event")
        shipment = from_json("payload.shipment_id")
        status = from_json("payload.status")
        sent_at = from_json("event_ts")
        super().__init__(
            config,
            event_id=first_of(joined(event, shipment, status, sent_at), joined(event, shipment, sent_at)),
            event_type=event,
        )
        self._tokens = TokenSet(secret_bytes(config.secrets))
        self._token_in = config.token_in
        self._token_param = config.token_param

    def check(self, request: WebhookRequest, body: BodyJson) -> Verdict | None:
        try:
            token = url_token(request.url, self._token_in, self._token_param)
        except ValueError:  # not UTF-8 once percent-decoded
            raise Refused(Reason.BAD_TOKEN, "the URL's token is not UTF-8 text") from None
        if not token:
            raise Refused(Reason.MISSING_TOKEN, "the URL carries no token")
        if not self._tokens.matches(token.encode("utf-8")):
            raise Refused(Reason.BAD_TOKEN, "the URL's token matches no configured token")
        if request.method.upper() == "GET":
            return handshake(200, b"OK", b"text/plain; charset=utf-8")
        return None
