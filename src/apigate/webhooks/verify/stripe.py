"""Stripe: ``Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>…][,v0=…]``, each v1 the HMAC-SHA256 of
``"{t}.{body}"`` keyed with the whole ``whsec_…`` string; any v1 may match (Stripe sends two
while a rolled secret is still valid).

Unlike Stripe's SDK, which only refuses a ``t`` older than the tolerance, a ``t`` more than the
tolerance in the future is refused too: it would otherwise stay replayable for longer.
"""

from __future__ import annotations

from typing import Literal

from apigate.webhooks.verify.common import (
    MAX_SIGNATURES,
    BodyJson,
    HmacKeys,
    Refused,
    SchemeBase,
    SchemeVerifier,
    Secrets,
    Timestamp,
    Tolerance,
    decode_signature,
    from_json,
    header_value,
    secret_bytes,
)
from apigate.webhooks.verify.model import Reason, Verdict, WebhookRequest

HEADER = "stripe-signature"


class StripeConfig(SchemeBase):
    """Event id: body ``id``; type: body ``type``."""

    scheme: Literal["stripe"]
    secrets: Secrets
    tolerance: Tolerance = 300.0

    def build(self) -> StripeVerifier:
        return StripeVerifier(self)


class StripeVerifier(SchemeVerifier):
    def __init__(self, config: StripeConfig) -> None:
        super().__init__(config, event_id=from_json("id"), event_type=from_json("type"))
        self._keys = HmacKeys(secret_bytes(config.secrets), "sha256")
        self._tolerance = config.tolerance

    def check(self, request: WebhookRequest, body: BodyJson) -> Verdict | None:
        value = header_value(request, (HEADER,), Reason.MISSING_SIGNATURE, Reason.MALFORMED_SIGNATURE)
        items = value.split(",")
        if len(items) > MAX_SIGNATURES:
            raise Refused(
                Reason.MALFORMED_SIGNATURE, f"the {HEADER} header has more than {MAX_SIGNATURES} items"
            )
        timestamp_text: str | None = None
        signatures: list[bytes] = []
        v1_seen = False
        for item in items:
            key, _, text = item.strip().partition("=")
            if key == "t" and timestamp_text is None:
                timestamp_text = text
            elif key == "v1":
                v1_seen = True
                if (signature := decode_signature(text, "hex", self._keys.digest_size)) is not None:
                    signatures.append(signature)
        if not signatures:
            problem = "no v1 signature is a hex SHA-256 digest" if v1_seen else "there is no v1 signature"
            raise Refused(Reason.MALFORMED_SIGNATURE, f"in the {HEADER} header {problem}")
        if timestamp_text is None:
            raise Refused(Reason.MISSING_TIMESTAMP, f"the {HEADER} header has no t= timestamp")
        timestamp = Timestamp(timestamp_text, f"{HEADER} t=")
        if not self._keys.matches(signatures, (timestamp_text.encode("ascii"), b".", request.body)):
            raise Refused(Reason.BAD_SIGNATURE, f"no {HEADER} v1 signature matches under any secret")
        timestamp.require_within(self._tolerance, request.now)
        return None
