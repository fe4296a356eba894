"""Twilio: ``X-Twilio-Signature`` is the base64 HMAC-SHA1, keyed with the auth token, of the full
public URL followed by the form parameters sorted by name (each name then its value; repeated
names' values sorted), as Twilio's ``RequestValidator`` computes it.

Like the SDK:

- a JSON body is not signed as parameters: the URL carries ``bodySHA256``, the hex SHA-256 of
  the body, and only the URL is signed;
- the URL is tried both without and with its port (the default one added when absent), since
  Twilio's own signing is inconsistent about it;
- ``X-Twilio-Webhooks-Signature-Settings: …,algorithm=HMAC_SHA256`` selects HMAC-SHA256.

The URL must be the one Twilio requested (scheme, host, port, path and query), rebuilt by the
caller behind trusted proxies. Twilio signs no timestamp; it retries with the same
``I-Twilio-Idempotency-Token``, which is the event id.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal
from urllib.parse import parse_qs, parse_qsl, urlsplit

from apigate.webhooks.verify.common import (
    BodyJson,
    HmacKeys,
    Refused,
    SchemeBase,
    SchemeVerifier,
    Secrets,
    decode_signature,
    from_header,
    header_value,
    secret_bytes,
)
from apigate.webhooks.verify.model import Reason, Verdict, WebhookRequest

HEADER = "x-twilio-signature"
SETTINGS_HEADER = "x-twilio-webhooks-signature-settings"
ALGORITHMS = {"HMAC_SHA1": "sha1", "HMAC_SHA256": "sha256"}
FORM = "application/x-www-form-urlencoded"
MAX_FORM_FIELDS = 1000


class TwilioConfig(SchemeBase):
    """Secrets are auth tokens (or SharedKey secrets). Event id: ``I-Twilio-Idempotency-Token``."""

    scheme: Literal["twilio"]
    secrets: Secrets

    def build(self) -> TwilioVerifier:
        return TwilioVerifier(self)


def url_variants(url: str) -> tuple[str, ...]:
    """``url`` without its port and with it (the scheme's default port when it has none)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return (url,)
    host = parts.netloc.rpartition(":")[0] if port is not None else parts.netloc
    default_port = 443 if parts.scheme == "https" else 80
    return (
        parts._replace(netloc=host).geturl(),
        parts._replace(netloc=f"{host}:{port or default_port}").geturl(),
    )


def _algorithm(request: WebhookRequest) -> str:
    for setting in request.headers.get(SETTINGS_HEADER, "").split(","):
        name, _, value = setting.partition("=")
        if name.strip() == "algorithm" and value.strip():
            if (digest := ALGORITHMS.get(value.strip().upper())) is None:
                raise Refused(Reason.MALFORMED_SIGNATURE, f"{SETTINGS_HEADER} names an unsupported algorithm")
            return digest
    return "sha1"


def _form_parameters(request: WebhookRequest) -> list[tuple[str, str]]:
    if not request.headers.get("content-type", "").lower().startswith(FORM):
        return []
    try:
        return parse_qsl(
            request.body.decode("utf-8"),
            keep_blank_values=True,
            errors="strict",
            max_num_fields=MAX_FORM_FIELDS,
        )
    except ValueError:  # UnicodeDecodeError is one
        raise Refused(Reason.MALFORMED_BODY, "the form body is not UTF-8 form data") from None


def _signed_parameters(parameters: list[tuple[str, str]]) -> bytes:
    values: dict[str, set[str]] = {}
    for name, value in parameters:
        values.setdefault(name, set()).add(value)
    return "".join(name + value for name in sorted(values) for value in sorted(values[name])).encode("utf-8")


class TwilioVerifier(SchemeVerifier):
    def __init__(self, config: TwilioConfig) -> None:
        super().__init__(config, event_id=from_header("i-twilio-idempotency-token"))
        secrets = secret_bytes(config.secrets)
        self._keys = {digest: HmacKeys(secrets, digest) for digest in ALGORITHMS.values()}

    def check(self, request: WebhookRequest, body: BodyJson) -> Verdict | None:
        value = header_value(request, (HEADER,), Reason.MISSING_SIGNATURE, Reason.MALFORMED_SIGNATURE)
        keys = self._keys[_algorithm(request)]
        signature = decode_signature(value, "base64", keys.digest_size)
        if signature is None:
            raise Refused(Reason.MALFORMED_SIGNATURE, f"the {HEADER} value is not a base64 HMAC digest")
        body_hash = parse_qs(urlsplit(request.url).query).get("bodySHA256")
        if body_hash:
            actual = hashlib.sha256(request.body).hexdigest()
            if not hmac.compare_digest(actual.encode(), body_hash[0].encode("utf-8", "replace")):
                raise Refused(Reason.BAD_BODY_HASH, "the body does not match the URL's bodySHA256")
            parameters = b""
        else:
            parameters = _signed_parameters(_form_parameters(request))
        if not any(
            keys.matches((signature,), (url.encode("utf-8"), parameters)) for url in url_variants(request.url)
        ):
            raise Refused(Reason.BAD_SIGNATURE, f"the {HEADER} signature does not match this URL and body")
        return None
