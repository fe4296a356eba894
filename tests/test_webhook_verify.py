"""Webhook signature verification presets (apigate.webhooks.verify).

Checked against the providers' published vectors and, where one exists, their official Python
library as an oracle: ``stripe`` and ``standardwebhooks`` sign requests and must agree with our
verdicts, and so must ``twilio``'s RequestValidator. Every request carries an injected clock;
nothing sleeps.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import random
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
import pytest
import standardwebhooks
import stripe
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import TypeAdapter, ValidationError
from twilio.request_validator import RequestValidator

from apigate.webhooks.verify import (
    Reason,
    SchemeConfig,
    Verdict,
    Verifier,
    WebhookRequest,
    build_verifier,
    shorthand_scheme,
)
from apigate.webhooks.verify.common import MAX_EVENT_ID_CHARS
from apigate.webhooks.verify.standard import StandardWebhooksConfig
from tests.support import webhook_vectors as vectors
from tests.support.pactown import PACTOWN_ENV, pactown_signature

SCHEMES: TypeAdapter[Any] = TypeAdapter(SchemeConfig)
NOW = 1_700_000_000
SENDER = "203.0.113.7"
URL = "https://hooks.example.com/webhooks/source?tenant=acme"
SHIPX_SENDER = "91.216.25.14"


def make_verifier(**config: Any) -> Verifier:
    return build_verifier(SCHEMES.validate_python(config))


def make_request(
    headers: dict[str, str],
    body: bytes = b"",
    *,
    url: str = URL,
    method: str = "POST",
    client_ip: str = SENDER,
    now: float = NOW,
) -> WebhookRequest:
    return WebhookRequest(method=method, url=url, headers=headers, body=body, client_ip=client_ip, now=now)


def with_headers(request: WebhookRequest, **changes: str | None) -> WebhookRequest:
    """``request`` with headers set (a value) or removed (None); names use _ for -."""
    headers = dict(request.headers)
    for name, value in changes.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return dataclasses.replace(request, headers=headers)


def mac(secret: str | bytes, content: bytes, digest: str = "sha256") -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, content, digest).digest()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def hex_to_base64(text: str) -> str:
    return b64(bytes.fromhex(text))


def base64_to_hex(text: str) -> str:
    return base64.b64decode(text).hex()


# --- every signed preset, described once; the generic tests below run on each -------------------


@dataclasses.dataclass(frozen=True)
class Signed:
    headers: dict[str, str]
    url: str = URL


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    config: dict[str, Any]
    secrets: tuple[str, str, str]
    """The old and the new secret of a rotation, then one never configured."""
    header: str
    sign: Callable[[str, bytes, int], Signed]
    misencode: Callable[[str], str]
    """The valid header value with its signature in the other encoding (hex <-> base64)."""
    body: bytes
    event_id: str | None
    event_type: str | None
    timestamped: bool = False

    def verifier(self, *secrets: str, **extra: Any) -> Verifier:
        return make_verifier(**self.config, secrets=list(secrets or self.secrets[:1]), **extra)

    def request(
        self, secret: str | None = None, *, timestamp: int = NOW, now: float = NOW, body: bytes | None = None
    ) -> WebhookRequest:
        """A request signed over ``self.body`` with ``secret`` at ``timestamp``, sending ``body``."""
        signed = self.sign(secret or self.secrets[0], self.body, timestamp)
        return make_request(signed.headers, self.body if body is None else body, url=signed.url, now=now)


STRIPE_BODY = (
    b'{"id": "evt_1NG8Du2eZvKYlo2CUI79vXWy", "object": "event", "type": "payment_intent.succeeded",'
    b' "data": {"object": {"id": "pi_3NG8Du2eZvKYlo2C0bZjGf6F"}}}'
)
STANDARD_ID = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
STANDARD_BODY = (
    b'{"type": "contact.created", "timestamp": "2022-11-03T20:26:10.344522Z", "data": {"id": "c_1"}}'
)
GITHUB_DELIVERY = "72d3162e-cc78-11e3-81ab-4c9367dc0958"
SHOPIFY_EVENT = "98880550-7158-44d4-b7cd-2c97c8a091b5"
SLACK_BODY = (
    b'{"token": "XXYYZZ", "team_id": "T123ABC456", "type": "event_callback", "event_id": "Ev123ABC456",'
    b' "event_time": 1700000000, "event": {"type": "app_mention", "text": "hi"}}'
)
TWILIO_URL = "https://hooks.example.com/twilio/sms?source=main"
TWILIO_IDEMPOTENCY = "e4b0c2d5-0f1c-4a51-9b7e-23c6b1f0a9d2-b6cf"
TWILIO_BODY = urlencode(
    {
        "MessageSid": "SM1234567890abcdef1234567890abcdef",
        "AccountSid": "AC1234567890abcdef1234567890abcdef",
        "From": "+14155550100",
        "To": "+14155550199",
        "Body": "Zażółć gęślą jaźń & 1+1=2",
        "NumMedia": "0",
        "FromZip": "",
    }
).encode()
FORM = "application/x-www-form-urlencoded"


class FormParams(dict[str, list[str]]):
    """Form parameters with repeated names, in the multi-dict shape twilio's validator reads."""

    def getall(self, name: str) -> list[str]:
        return self[name]


def form_params(body: bytes) -> FormParams:
    params = FormParams()
    for name, value in parse_qsl(body.decode(), keep_blank_values=True):
        params.setdefault(name, []).append(value)
    return params


def sign_stripe(secret: str, body: bytes, timestamp: int) -> Signed:
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, timestamp=timestamp)
    return Signed({"stripe-signature": header})


def sign_github(secret: str, body: bytes, _timestamp: int) -> Signed:
    return Signed(
        {
            "x-hub-signature-256": "sha256=" + mac(secret, body).hex(),
            "x-github-delivery": GITHUB_DELIVERY,
            "x-github-hook-id": "292430182",
            "x-github-event": "issues",
        }
    )


def sign_standard(secret: str, body: bytes, timestamp: int) -> Signed:
    moment = datetime.fromtimestamp(timestamp, UTC)
    signature = standardwebhooks.Webhook(secret).sign(STANDARD_ID, moment, body.decode())
    return Signed(
        {"webhook-id": STANDARD_ID, "webhook-timestamp": str(timestamp), "webhook-signature": signature}
    )


def sign_shopify(secret: str, body: bytes, _timestamp: int) -> Signed:
    return Signed(
        {
            "x-shopify-hmac-sha256": b64(mac(secret, body)),
            "x-shopify-topic": "orders/create",
            "x-shopify-event-id": SHOPIFY_EVENT,
            "x-shopify-webhook-id": "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043",
        }
    )


def sign_slack(secret: str, body: bytes, timestamp: int) -> Signed:
    signature = "v0=" + mac(secret, f"v0:{timestamp}:".encode() + body).hex()
    return Signed({"x-slack-signature": signature, "x-slack-request-timestamp": str(timestamp)})


def sign_twilio(secret: str, body: bytes, _timestamp: int) -> Signed:
    signature = RequestValidator(secret).compute_signature(TWILIO_URL, form_params(body))
    headers = {
        "x-twilio-signature": signature,
        "content-type": FORM,
        "i-twilio-idempotency-token": TWILIO_IDEMPOTENCY,
    }
    return Signed(headers, TWILIO_URL)


def sign_inpost_hex(secret: str, body: bytes, _timestamp: int) -> Signed:
    return Signed({"x-inpost-signature": "sha256=" + mac(secret, body).hex()})


def sign_inpost_group(secret: str, body: bytes, timestamp: int) -> Signed:
    signature = b64(mac(secret, f"{timestamp}.".encode() + body))
    return Signed({"x-inpost-signature": signature, "x-inpost-timestamp": str(timestamp)})


def sign_allegro(secret: str, body: bytes, _timestamp: int) -> Signed:
    return Signed({"x-allegro-signature": mac(secret, body).hex()})


def sign_generic(secret: str, body: bytes, timestamp: int) -> Signed:
    signature = "sha512=" + b64(mac(secret, f"{timestamp}:evt-42:".encode() + body, "sha512"))
    return Signed({"x-signature": signature, "x-timestamp": str(timestamp), "x-event-id": "evt-42"})


def standard_secret(seed: bytes) -> str:
    return "whsec_" + b64(hashlib.sha256(seed).digest())


PRESETS = [
    Preset(
        name="stripe",
        config={"scheme": "stripe"},
        secrets=("whsec_old_0123456789abcdef", "whsec_new_fedcba9876543210", "whsec_never_configured"),
        header="stripe-signature",
        sign=sign_stripe,
        misencode=lambda value: re.sub(r"v1=([0-9a-f]+)", lambda m: "v1=" + hex_to_base64(m[1]), value),
        body=STRIPE_BODY,
        event_id="evt_1NG8Du2eZvKYlo2CUI79vXWy",
        event_type="payment_intent.succeeded",
        timestamped=True,
    ),
    Preset(
        name="github",
        config={"scheme": "github"},
        secrets=("github-old-secret", "github-new-secret", "github-other-secret"),
        header="x-hub-signature-256",
        sign=sign_github,
        misencode=lambda value: "sha256=" + hex_to_base64(value.removeprefix("sha256=")),
        body=b'{"action": "opened", "issue": {"id": 1}}',
        event_id=f"292430182:{GITHUB_DELIVERY}",
        event_type="issues",
    ),
    Preset(
        name="standard",
        config={"scheme": "standard"},
        secrets=(standard_secret(b"old"), standard_secret(b"new"), standard_secret(b"other")),
        header="webhook-signature",
        sign=sign_standard,
        misencode=lambda value: "v1," + base64_to_hex(value.removeprefix("v1,")),
        body=STANDARD_BODY,
        event_id=STANDARD_ID,
        event_type="contact.created",
        timestamped=True,
    ),
    Preset(
        name="shopify",
        config={"scheme": "shopify"},
        secrets=("shpss_old_client_secret", "shpss_new_client_secret", "shpss_other_secret"),
        header="x-shopify-hmac-sha256",
        sign=sign_shopify,
        misencode=base64_to_hex,
        body=b'{"id": 820982911946154508, "email": "jon@example.com"}',
        event_id=SHOPIFY_EVENT,
        event_type="orders/create",
    ),
    Preset(
        name="slack",
        config={"scheme": "slack"},
        secrets=("slack-old-signing-secret", "slack-new-signing-secret", "slack-other-secret"),
        header="x-slack-signature",
        sign=sign_slack,
        misencode=lambda value: "v0=" + hex_to_base64(value.removeprefix("v0=")),
        body=SLACK_BODY,
        event_id="Ev123ABC456",
        event_type="app_mention",
        timestamped=True,
    ),
    Preset(
        name="twilio",
        config={"scheme": "twilio"},
        secrets=("twilio-old-auth-token", "twilio-new-auth-token", "twilio-other-token"),
        header="x-twilio-signature",
        sign=sign_twilio,
        misencode=base64_to_hex,
        body=TWILIO_BODY,
        event_id=TWILIO_IDEMPOTENCY,
        event_type=None,
    ),
    Preset(
        name="inpost_hex",
        config={"scheme": "inpost"},
        secrets=("inpost-old-secret", "inpost-new-secret", "inpost-other-secret"),
        header="x-inpost-signature",
        sign=sign_inpost_hex,
        misencode=lambda value: "sha256=" + hex_to_base64(value.removeprefix("sha256=")),
        body=b'{"shipment": "620000000000000000000000", "status": "delivered"}',
        event_id=None,
        event_type=None,
    ),
    Preset(
        name="inpost_group",
        config={"scheme": "inpost"},
        secrets=("inpost-old-secret", "inpost-new-secret", "inpost-other-secret"),
        header="x-inpost-signature",
        sign=sign_inpost_group,
        misencode=base64_to_hex,
        body=b'{"eventType": "SHIPMENT_STATUS_CHANGED", "trackingNumber": "620000000000000000000000"}',
        event_id=None,
        event_type=None,
        timestamped=True,
    ),
    Preset(
        name="allegro",
        config={"scheme": "allegro"},
        secrets=("allegro-old-secret", "allegro-new-secret", "allegro-other-secret"),
        header="x-allegro-signature",
        sign=sign_allegro,
        misencode=hex_to_base64,
        body=b'{"id": "2b6d7a0e", "type": "READY_FOR_PROCESSING"}',
        event_id=None,
        event_type=None,
    ),
    Preset(
        name="hmac",
        config={
            "scheme": "hmac",
            "header": "X-Signature",
            "algorithm": "sha512",
            "encoding": "base64",
            "prefix": "sha512=",
            "signed_content": "{timestamp}:{id}:{body}",
            "timestamp_header": "X-Timestamp",
            "id_header": "X-Event-Id",
            "type_json_path": "kind",
        },
        secrets=("generic-old-secret", "generic-new-secret", "generic-other-secret"),
        header="x-signature",
        sign=sign_generic,
        misencode=lambda value: "sha512=" + base64_to_hex(value.removeprefix("sha512=")),
        body=b'{"kind": "thing.happened", "n": 1}',
        event_id="evt-42",
        event_type="thing.happened",
        timestamped=True,
    ),
]
EACH_PRESET = pytest.mark.parametrize("preset", PRESETS, ids=lambda preset: preset.name)
EACH_TIMESTAMPED = pytest.mark.parametrize(
    "preset", [p for p in PRESETS if p.timestamped], ids=lambda preset: preset.name
)


def assert_refused(verdict: Verdict, reason: Reason, *hidden: str) -> None:
    """Refused for ``reason``, with a message naming the fault and echoing none of ``hidden``."""
    assert (verdict.ok, verdict.reason) == (False, reason), verdict
    assert verdict.message and verdict.answer is None
    assert verdict.event_id is None and verdict.event_type is None
    for text in hidden:
        assert text not in verdict.message


@EACH_PRESET
def test_a_signed_request_is_accepted_with_its_event_id_and_type(preset: Preset) -> None:
    verdict = preset.verifier().verify(preset.request())
    assert verdict == Verdict(True, "ok", "", preset.event_id, preset.event_type)


@EACH_PRESET
def test_a_tampered_body_is_refused(preset: Preset) -> None:
    request = preset.request(body=preset.body + b" ")
    assert_refused(preset.verifier().verify(request), Reason.BAD_SIGNATURE, preset.secrets[0])


@EACH_PRESET
def test_a_missing_signature_header_is_refused(preset: Preset) -> None:
    request = with_headers(preset.request(), **{preset.header: None})
    assert_refused(preset.verifier().verify(request), Reason.MISSING_SIGNATURE)


@EACH_PRESET
@pytest.mark.parametrize("value", ["", "   "], ids=["empty", "blank"])
def test_an_empty_signature_header_counts_as_missing(preset: Preset, value: str) -> None:
    request = with_headers(preset.request(), **{preset.header: value})
    assert_refused(preset.verifier().verify(request), Reason.MISSING_SIGNATURE)


GARBAGE = {
    "garbage": "%%% not a signature %%%",
    "not-utf8": "\xff\xfe\xc3\x28" * 20,
    "huge": "A" * 100_000,
    "control": "sha256=\x00\x01\x02",
    "truncated": "v1=abc",
}


@EACH_PRESET
@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_a_malformed_signature_header_is_refused(preset: Preset, garbage: str) -> None:
    request = with_headers(preset.request(), **{preset.header: garbage})
    assert_refused(preset.verifier().verify(request), Reason.MALFORMED_SIGNATURE, garbage)


@EACH_PRESET
def test_a_signature_in_the_wrong_encoding_is_malformed(preset: Preset) -> None:
    request = preset.request()
    misencoded = preset.misencode(request.headers[preset.header])
    request = with_headers(request, **{preset.header: misencoded})
    assert_refused(preset.verifier().verify(request), Reason.MALFORMED_SIGNATURE, misencoded)


@EACH_PRESET
def test_a_signature_made_with_another_secret_is_refused(preset: Preset) -> None:
    old, new, never = preset.secrets
    request = preset.request(never)
    verdict = preset.verifier(old, new).verify(request)
    assert_refused(verdict, Reason.BAD_SIGNATURE, old, new, never, request.headers[preset.header])


@EACH_PRESET
def test_rotation_accepts_old_and_new_secrets_and_refuses_a_removed_one(preset: Preset) -> None:
    old, new, _ = preset.secrets
    rotating = preset.verifier(old, new)
    assert rotating.verify(preset.request(old)).ok
    assert rotating.verify(preset.request(new)).ok
    assert_refused(preset.verifier(new).verify(preset.request(old)), Reason.BAD_SIGNATURE, old)


@EACH_TIMESTAMPED
@pytest.mark.parametrize(
    ("offset", "accepted"),
    [
        (0, True),
        (-300, True),
        (300, True),
        (-301, False),
        (301, False),
        (-86_400, False),
        (31_536_000, False),
    ],
)
def test_timestamps_outside_the_tolerance_are_refused_both_ways(
    preset: Preset, offset: int, accepted: bool
) -> None:
    verdict = preset.verifier().verify(preset.request(timestamp=NOW + offset))
    if accepted:
        assert verdict.ok
    else:
        assert_refused(verdict, Reason.STALE_TIMESTAMP)


@EACH_TIMESTAMPED
def test_the_signature_is_judged_before_the_timestamp(preset: Preset) -> None:
    """A forged old request says bad_signature: stale_timestamp is kept for authentic late ones."""
    request = preset.request(preset.secrets[2], timestamp=NOW - 3600)
    assert_refused(preset.verifier().verify(request), Reason.BAD_SIGNATURE)


@EACH_TIMESTAMPED
def test_the_tolerance_is_configurable(preset: Preset) -> None:
    request = preset.request(timestamp=NOW - 500)
    assert preset.verifier(tolerance="10m").verify(request).ok
    assert_refused(
        preset.verifier(tolerance=60).verify(preset.request(timestamp=NOW - 61)), Reason.STALE_TIMESTAMP
    )


TIMESTAMP_HEADERS = [
    ("standard", "webhook-timestamp"),
    ("slack", "x-slack-request-timestamp"),
    ("hmac", "x-timestamp"),
]
PRESET_BY_NAME = {preset.name: preset for preset in PRESETS}


@pytest.mark.parametrize(("name", "header"), TIMESTAMP_HEADERS)
def test_a_missing_timestamp_header_is_refused(name: str, header: str) -> None:
    preset = PRESET_BY_NAME[name]
    request = with_headers(preset.request(), **{header: None})
    assert_refused(preset.verifier().verify(request), Reason.MISSING_TIMESTAMP)


@pytest.mark.parametrize(("name", "header"), TIMESTAMP_HEADERS)
@pytest.mark.parametrize(
    "value", ["soon", "1700000000.5", "-1700000000", "1e9", "\u0661\u0667" + "\u0660" * 8, "9" * 40]
)
def test_a_malformed_timestamp_header_is_refused(name: str, header: str, value: str) -> None:
    preset = PRESET_BY_NAME[name]
    request = with_headers(preset.request(), **{header: value})
    assert_refused(preset.verifier().verify(request), Reason.MALFORMED_TIMESTAMP)


@EACH_PRESET
def test_the_sender_allowlist_is_checked_first(preset: Preset) -> None:
    verifier = preset.verifier(allowed_cidrs=["198.51.100.0/24", "2001:db8::/32"])
    request = preset.request()
    assert_refused(verifier.verify(request), Reason.SENDER_NOT_ALLOWED)
    assert_refused(verifier.verify(make_request({}, client_ip=SENDER)), Reason.SENDER_NOT_ALLOWED)
    for address in ("198.51.100.20", "::ffff:198.51.100.20", "2001:db8::1"):
        assert verifier.verify(dataclasses.replace(request, client_ip=address)).ok, address
    for address in ("", "unix:/run/apigate.sock", "198.51.100.20:443", "999.1.1.1"):
        assert_refused(
            verifier.verify(dataclasses.replace(request, client_ip=address)), Reason.SENDER_NOT_ALLOWED
        )


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.name != "hmac"], ids=lambda p: p.name)
def test_configured_headers_override_the_presets_event_id_and_type(preset: Preset) -> None:
    verifier = preset.verifier(id_header="X-Delivery-Key", type_header="X-Kind")
    request = with_headers(preset.request(), x_delivery_key="delivery-7", x_kind="kind-7")
    verdict = verifier.verify(request)
    assert (verdict.ok, verdict.event_id, verdict.event_type) == (True, "delivery-7", "kind-7")


def test_configured_json_paths_override_the_presets_event_id_and_type() -> None:
    preset = PRESET_BY_NAME["stripe"]
    verdict = preset.verifier(id_json_path="data.object.id", type_json_path="object").verify(preset.request())
    assert (verdict.event_id, verdict.event_type) == ("pi_3NG8Du2eZvKYlo2C0bZjGf6F", "event")
    verdict = preset.verifier(id_json_path="data.nothing.here").verify(preset.request())
    assert verdict.ok and verdict.event_id is None


def test_an_overlong_event_id_is_replaced_by_its_digest() -> None:
    preset = PRESET_BY_NAME["github"]
    delivery = "d" * 600
    verdict = preset.verifier().verify(with_headers(preset.request(), x_github_delivery=delivery))
    expected = "sha256:" + hashlib.sha256(f"292430182:{delivery}".encode()).hexdigest()
    assert verdict.event_id == expected


def random_text(rng: random.Random) -> str:
    pieces = ["t=", "v1=", "v0=", "v1,", "v1a,", "sha256=", ",", " ", "=", "whsec_", "1700000000", "Basic "]
    if rng.random() < 0.05:
        return rng.choice(pieces) * 5000
    length = rng.choice([0, 1, 8, 64, 300])
    text = "".join(
        rng.choice(pieces) if rng.random() < 0.3 else chr(rng.randrange(256)) for _ in range(length)
    )
    return text[:length]


@EACH_PRESET
def test_random_garbage_is_refused_without_an_internal_error(preset: Preset) -> None:
    rng = random.Random(preset.name)
    verifier = preset.verifier(*preset.secrets[:2])
    names = [
        *preset.request().headers,
        "content-type",
        "authorization",
        "svix-signature",
        "x-inpost-timestamp",
    ]
    urls = [URL, "not a url", "https://h:99999/x?bodySHA256=zz", "http://[::1]:8080/?token=%ff", "//x?%"]
    refusals = set(Reason) - {Reason.OK, Reason.HANDSHAKE, Reason.VERIFICATION_ERROR}
    for _ in range(300):
        headers = {name: random_text(rng) for name in rng.sample(names, rng.randint(0, len(names)))}
        body = rng.randbytes(rng.choice([0, 10, 1000]))
        url = rng.choice(urls) + random_text(rng)[:50]
        now = rng.choice([NOW, 0, 1e15, -1e15])
        verdict = verifier.verify(
            make_request(headers, body, url=url, now=now, method=rng.choice(["POST", "GET"]))
        )
        assert verdict.reason in refusals, (verdict, headers)


@EACH_PRESET
def test_garbled_requests_around_a_valid_signature_are_refused_without_an_internal_error(
    preset: Preset,
) -> None:
    """Past the signature header: garbage timestamps, ids, content types, URLs and bodies."""
    rng = random.Random(preset.name)
    verifier = preset.verifier()
    valid = preset.request()
    others = [name for name in valid.headers if name != preset.header]
    others += ["content-type", "x-twilio-webhooks-signature-settings"]
    refusals = set(Reason) - {Reason.OK, Reason.HANDSHAKE, Reason.VERIFICATION_ERROR}
    seen = set()
    for _ in range(300):
        garbled = {name: random_text(rng) for name in rng.sample(others, rng.randint(0, len(others)))}
        body = rng.randbytes(rng.choice([1, 10, 1000])) + b"\x00"
        url = rng.choice([valid.url, valid.url + "&bodySHA256=" + random_text(rng)[:70], random_text(rng)])
        request = dataclasses.replace(with_headers(valid, **garbled), body=body, url=url)
        verdict = verifier.verify(request)
        assert verdict.reason in refusals, (verdict, garbled)
        seen.add(verdict.reason)
    assert Reason.BAD_SIGNATURE in seen


def test_key_material_is_computed_when_the_verifier_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    signed = [(preset.name, preset.verifier(), preset.request()) for preset in PRESETS]

    def keyed_per_request(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a secret was keyed while verifying")

    monkeypatch.setattr(hmac, "new", keyed_per_request)
    for name, verifier, request in signed:
        assert verifier.verify(request).ok, name


# --- published vectors ------------------------------------------------------------------------


def test_github_docs_vector() -> None:
    verifier = make_verifier(scheme="github", secrets=[vectors.GITHUB_SECRET])
    request = make_request({"x-hub-signature-256": vectors.GITHUB_SIGNATURE}, vectors.GITHUB_PAYLOAD)
    assert verifier.verify(request).ok
    delivery_only = with_headers(request, x_github_delivery=GITHUB_DELIVERY)
    assert verifier.verify(delivery_only).event_id == GITHUB_DELIVERY


def test_standard_webhooks_hmac_vector() -> None:
    verifier = make_verifier(scheme="standard", secrets=[vectors.STANDARD_SECRET])
    headers = {
        "webhook-id": vectors.STANDARD_MSG_ID,
        "webhook-timestamp": str(vectors.STANDARD_TIMESTAMP),
        "webhook-signature": vectors.STANDARD_SIGNATURE,
    }
    request = make_request(headers, vectors.STANDARD_PAYLOAD, now=vectors.STANDARD_TIMESTAMP)
    assert verifier.verify(request).ok
    svix = {name.replace("webhook-", "svix-"): value for name, value in headers.items()}
    verdict = verifier.verify(dataclasses.replace(request, headers=svix))
    assert verdict.ok and verdict.event_id == vectors.STANDARD_MSG_ID
    # the secret works without its whsec_ prefix, as the standard's libraries accept it
    unprefixed = make_verifier(scheme="standard", secrets=[vectors.STANDARD_SECRET.removeprefix("whsec_")])
    assert unprefixed.verify(request).ok


def test_the_event_id_is_the_signed_one_not_another_familys_header() -> None:
    """A captured svix-* request resent with a made-up webhook-id must keep its signed id (dedupe)."""
    verifier = make_verifier(scheme="standard", secrets=[vectors.STANDARD_SECRET])
    svix = {
        "svix-id": vectors.STANDARD_MSG_ID,
        "svix-timestamp": str(vectors.STANDARD_TIMESTAMP),
        "svix-signature": vectors.STANDARD_SIGNATURE,
        "webhook-id": "attacker-chosen",
    }
    verdict = verifier.verify(make_request(svix, vectors.STANDARD_PAYLOAD, now=vectors.STANDARD_TIMESTAMP))
    assert verdict.ok and verdict.event_id == vectors.STANDARD_MSG_ID


@pytest.mark.parametrize(
    "bad", ["evt\r\nx-injected: 1", "evt\x00", "évènement", "e" * (MAX_EVENT_ID_CHARS + 1)]
)
def test_an_id_unfit_for_a_header_is_replaced_by_its_hash_and_such_a_type_dropped(bad: str) -> None:
    secret = "whsec_test_secret_for_ids"
    body = orjson.dumps({"id": bad, "type": bad})
    signed = sign_stripe(secret, body, NOW)
    verdict = make_verifier(scheme="stripe", secrets=[secret]).verify(make_request(signed.headers, body))
    assert verdict.ok
    assert verdict.event_id == "sha256:" + hashlib.sha256(bad.encode()).hexdigest()
    assert verdict.event_type is None


def ed25519_public_key(private: Ed25519PrivateKey) -> str:
    return "whpk_" + b64(private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def test_standard_webhooks_ed25519_vector() -> None:
    private = Ed25519PrivateKey.from_private_bytes(base64.b64decode(vectors.STANDARD_ED25519_SEED))
    verifier = make_verifier(scheme="standard", public_keys=[ed25519_public_key(private)])
    headers = {
        "webhook-id": vectors.STANDARD_MSG_ID,
        "webhook-timestamp": str(vectors.STANDARD_TIMESTAMP),
        "webhook-signature": vectors.STANDARD_ED25519_SIGNATURE,
    }
    request = make_request(headers, vectors.STANDARD_PAYLOAD, now=vectors.STANDARD_TIMESTAMP)
    assert verifier.verify(request).ok
    assert_refused(verifier.verify(dataclasses.replace(request, body=b"{}")), Reason.BAD_SIGNATURE)
    assert_refused(
        verifier.verify(dataclasses.replace(request, now=vectors.STANDARD_TIMESTAMP + 301)),
        Reason.STALE_TIMESTAMP,
    )


def test_standard_webhooks_ed25519_keys_rotate_and_mix_with_hmac_secrets() -> None:
    old, new, other = (Ed25519PrivateKey.generate() for _ in range(3))
    content = f"{STANDARD_ID}.{NOW}.".encode() + STANDARD_BODY

    def request_signed_by(*signatures: str) -> WebhookRequest:
        headers = {
            "webhook-id": STANDARD_ID,
            "webhook-timestamp": str(NOW),
            "webhook-signature": " ".join(signatures),
        }
        return make_request(headers, STANDARD_BODY)

    def v1a(key: Ed25519PrivateKey) -> str:
        return "v1a," + b64(key.sign(content))

    rotating = make_verifier(
        scheme="standard", public_keys=[ed25519_public_key(old), ed25519_public_key(new)]
    )
    assert rotating.verify(request_signed_by(v1a(old))).ok
    assert rotating.verify(request_signed_by(v1a(new))).ok
    assert_refused(rotating.verify(request_signed_by(v1a(other))), Reason.BAD_SIGNATURE)
    assert rotating.verify(request_signed_by("v2,abc", v1a(other), v1a(new))).ok

    hmac_secret = PRESET_BY_NAME["standard"].secrets[0]
    v1 = sign_standard(hmac_secret, STANDARD_BODY, NOW).headers["webhook-signature"]
    both = make_verifier(scheme="standard", secrets=[hmac_secret], public_keys=[ed25519_public_key(new)])
    assert both.verify(request_signed_by(v1)).ok
    assert both.verify(request_signed_by(v1a(new))).ok
    assert_refused(both.verify(request_signed_by("v1a,")), Reason.MALFORMED_SIGNATURE)
    too_many = " ".join([v1a(other)] * 17)
    assert_refused(both.verify(request_signed_by(too_many)), Reason.MALFORMED_SIGNATURE)


def test_standard_webhooks_needs_the_message_id() -> None:
    preset = PRESET_BY_NAME["standard"]
    assert_refused(
        preset.verifier().verify(with_headers(preset.request(), webhook_id=None)), Reason.MISSING_ID
    )


def test_slack_docs_vector() -> None:
    verifier = make_verifier(scheme="slack", secrets=[vectors.SLACK_SECRET])
    headers = {
        "x-slack-signature": vectors.SLACK_SIGNATURE,
        "x-slack-request-timestamp": str(vectors.SLACK_TIMESTAMP),
    }
    verdict = verifier.verify(make_request(headers, vectors.SLACK_BODY, now=vectors.SLACK_TIMESTAMP))
    # a slash command is form data: no event id
    assert verdict == Verdict(True, "ok")


def test_slack_url_verification_is_answered_with_the_challenge_once_verified() -> None:
    preset = PRESET_BY_NAME["slack"]
    challenge = b"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    body = b'{"token": "Jhj5dZrVaK7ZwHHjRyZWjbDl", "challenge": "%s", "type": "url_verification"}' % challenge
    request = make_request(sign_slack(preset.secrets[0], body, NOW).headers, body)
    verdict = preset.verifier().verify(request)
    assert verdict == Verdict(True, "handshake", answer=(200, challenge, b"text/plain; charset=utf-8"))
    assert_refused(
        preset.verifier().verify(dataclasses.replace(request, body=body + b" ")), Reason.BAD_SIGNATURE
    )
    not_answered = preset.verifier(answer_url_verification=False).verify(request)
    assert (not_answered.ok, not_answered.answer, not_answered.event_type) == (True, None, "url_verification")


def test_twilio_published_vectors() -> None:
    verifier = make_verifier(scheme="twilio", secrets=[vectors.TWILIO_TOKEN])
    form = urlencode(vectors.TWILIO_PARAMS).encode()

    def verdict(url: str, signature: str, body: bytes = form, content_type: str = FORM) -> Verdict:
        headers = {"x-twilio-signature": signature, "content-type": content_type}
        return verifier.verify(make_request(headers, body, url=url))

    assert verdict(vectors.TWILIO_URL, vectors.TWILIO_SIGNATURE).ok
    # the port is tried both ways: removed when present, the default one added when absent
    assert verdict(vectors.TWILIO_URL.replace(".com", ".com:1234"), vectors.TWILIO_SIGNATURE).ok
    assert verdict(vectors.TWILIO_URL, vectors.TWILIO_SIGNATURE_HTTPS_PORT_443).ok
    http = vectors.TWILIO_URL.replace("https", "http")
    assert verdict(http, vectors.TWILIO_SIGNATURE_HTTP_PORT_80).ok
    assert verdict(http.replace(".com", ".com:1234"), vectors.TWILIO_SIGNATURE_HTTP_PORT_1234).ok
    assert_refused(
        verdict(vectors.TWILIO_URL.replace("bar=2", "bar=3"), vectors.TWILIO_SIGNATURE), Reason.BAD_SIGNATURE
    )
    assert verdict(vectors.TWILIO_URL, vectors.TWILIO_DUPLICATES_SIGNATURE, vectors.TWILIO_DUPLICATES_BODY).ok

    json_url = f"{vectors.TWILIO_URL}&bodySHA256={vectors.TWILIO_BODY_SHA256}"
    json = "application/json"
    assert verdict(json_url, vectors.TWILIO_JSON_SIGNATURE, vectors.TWILIO_JSON_BODY, json).ok
    tampered = vectors.TWILIO_JSON_BODY.replace(b"true", b"false")
    assert_refused(verdict(json_url, vectors.TWILIO_JSON_SIGNATURE, tampered, json), Reason.BAD_BODY_HASH)


def test_twilio_signs_a_get_by_its_url_alone() -> None:
    url = "https://hooks.example.com/twilio/status?CallSid=CA123&CallStatus=completed"
    signature = RequestValidator("token").compute_signature(url, {})
    request = make_request({"x-twilio-signature": signature}, url=url, method="GET")
    assert make_verifier(scheme="twilio", secrets=["token"]).verify(request).ok


def test_twilio_hmac_sha256_is_chosen_by_the_signature_settings_header() -> None:
    preset = PRESET_BY_NAME["twilio"]
    secret = preset.secrets[0]
    signature = RequestValidator(secret).compute_signature(
        TWILIO_URL, form_params(TWILIO_BODY), "HMAC_SHA256"
    )
    request = with_headers(
        preset.request(),
        x_twilio_signature=signature,
        x_twilio_webhooks_signature_settings="key=webhooks_sharedkey_1,algorithm=HMAC_SHA256",
    )
    assert preset.verifier().verify(request).ok
    sha1 = with_headers(request, x_twilio_signature=preset.request().headers["x-twilio-signature"])
    assert_refused(preset.verifier().verify(sha1), Reason.MALFORMED_SIGNATURE)
    unknown = with_headers(request, x_twilio_webhooks_signature_settings="key=k,algorithm=HMAC_SHA3")
    assert_refused(preset.verifier().verify(unknown), Reason.MALFORMED_SIGNATURE)


def test_twilio_refuses_a_form_body_that_is_not_utf8() -> None:
    preset = PRESET_BY_NAME["twilio"]
    request = preset.request(body=b"Body=%FF%FE&From=%2B1")
    assert_refused(preset.verifier().verify(request), Reason.MALFORMED_BODY)
    assert_refused(preset.verifier().verify(preset.request(body=b"Body=\xff")), Reason.MALFORMED_BODY)


# --- official libraries as oracles ------------------------------------------------------------


def test_stripe_verdicts_agree_with_the_stripe_library() -> None:
    secret, other = "whsec_oracle_secret", "whsec_oracle_other"
    now = int(time.time())
    body = STRIPE_BODY.decode()
    good = stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=now)
    forged = stripe.WebhookSignature.generate_signature_header(body, other, timestamp=now)
    good_v1 = good.split(",")[1]
    cases = [
        (good, body),
        (good, body + " "),
        (forged, body),
        (f"{forged},{good_v1}", body),
        (f"{good},v0=00ff", body),
        (f"{good_v1},t={now}", body),
        (stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=now - 301), body),
        (stripe.WebhookSignature.generate_signature_header(body, secret, timestamp=now - 299), body),
        (good.replace("v1=", "v0="), body),
        (f"t={now}", body),
        ("t=soon," + good_v1, body),
        ("garbage", body),
        (good.upper(), body),
    ]
    verifier = make_verifier(scheme="stripe", secrets=[secret])
    for header, payload in cases:
        try:
            stripe.WebhookSignature.verify_header(payload, header, secret, tolerance=300)
            theirs = True
        except stripe.SignatureVerificationError:
            theirs = False
        ours = verifier.verify(make_request({"stripe-signature": header}, payload.encode(), now=now))
        assert ours.ok == theirs, (header, ours)

    event = stripe.Webhook.construct_event(body, good, secret)
    verdict = verifier.verify(make_request({"stripe-signature": good}, STRIPE_BODY, now=now))
    assert (verdict.event_id, verdict.event_type) == (event.id, event.type)


def test_stripe_refuses_a_far_future_timestamp_the_library_would_accept() -> None:
    secret = "whsec_oracle_secret"
    now = int(time.time())
    header = stripe.WebhookSignature.generate_signature_header(
        STRIPE_BODY.decode(), secret, timestamp=now + 3600
    )
    assert stripe.WebhookSignature.verify_header(STRIPE_BODY, header, secret, tolerance=300)
    verdict = make_verifier(scheme="stripe", secrets=[secret]).verify(
        make_request({"stripe-signature": header}, STRIPE_BODY, now=now)
    )
    assert_refused(verdict, Reason.STALE_TIMESTAMP)


def test_stripe_header_without_a_timestamp_or_with_too_many_items() -> None:
    preset = PRESET_BY_NAME["stripe"]
    v1 = preset.request().headers["stripe-signature"].split(",")[1]
    assert_refused(
        preset.verifier().verify(with_headers(preset.request(), stripe_signature=v1)),
        Reason.MISSING_TIMESTAMP,
    )
    crowded = ",".join([v1] * 17) + f",t={NOW}"
    assert_refused(
        preset.verifier().verify(with_headers(preset.request(), stripe_signature=crowded)),
        Reason.MALFORMED_SIGNATURE,
    )


def test_standard_verdicts_agree_with_the_standardwebhooks_library() -> None:
    secret, other = PRESET_BY_NAME["standard"].secrets[:2]
    now = int(time.time())
    body = STANDARD_BODY.decode()

    def signature(key: str = secret, at: int = now, msg_id: str = STANDARD_ID, data: str = body) -> str:
        return standardwebhooks.Webhook(key).sign(msg_id, datetime.fromtimestamp(at, UTC), data)

    def headers(sig: str, at: int = now, msg_id: str = STANDARD_ID) -> dict[str, str]:
        return {"webhook-id": msg_id, "webhook-timestamp": str(at), "webhook-signature": sig}

    cases = [
        (headers(signature()), body),
        (headers(signature()), body + " "),
        (headers(signature(other)), body),
        (headers(signature(at=now - 301), at=now - 301), body),
        (headers(signature(at=now + 301), at=now + 301), body),
        (headers(signature(at=now - 299), at=now - 299), body),
        (headers(signature(), msg_id="msg_other"), body),
        (headers(signature(), at=now + 1), body),
        (headers(f"v2,{signature().split(',')[1]} {signature(other)} {signature()}"), body),
        (headers(signature().replace("v1,", "v1a,")), body),
        ({"webhook-id": STANDARD_ID, "webhook-signature": signature()}, body),
        ({"webhook-timestamp": str(now), "webhook-signature": signature()}, body),
    ]
    verifier = make_verifier(scheme="standard", secrets=[secret])
    for request_headers, payload in cases:
        try:
            standardwebhooks.Webhook(secret).verify(payload, request_headers)
            theirs = True
        except standardwebhooks.WebhookVerificationError:
            theirs = False
        ours = verifier.verify(make_request(request_headers, payload.encode(), now=now))
        assert ours.ok == theirs, (request_headers, ours)


def test_twilio_verdicts_agree_with_the_request_validator() -> None:
    rng = random.Random(7)
    token = "oracle-auth-token"
    verifier = make_verifier(scheme="twilio", secrets=[token])
    alphabet = "abcXYZ019 +&=%/?éż€"
    urls = [
        "https://hooks.example.com/sms",
        "https://hooks.example.com:8443/sms?x=1",
        "http://hooks.example.com/v",
    ]
    for _ in range(60):
        pairs = [
            (
                rng.choice(["Body", "From", "To", "MediaUrl0", "Digits"]),
                "".join(rng.choices(alphabet, k=rng.randint(0, 12))),
            )
            for _ in range(rng.randint(0, 6))
        ]
        body = urlencode(pairs).encode()
        url = rng.choice(urls)
        params = form_params(body)
        signature = RequestValidator(token).compute_signature(url, params)
        for sent_url, sent_body in [(url, body), (url + "&y=2", body), (url, body + b"&Extra=1")]:
            theirs = RequestValidator(token).validate(sent_url, form_params(sent_body), signature)
            headers = {"x-twilio-signature": signature, "content-type": FORM}
            ours = verifier.verify(make_request(headers, sent_body, url=sent_url))
            assert ours.ok == theirs, (sent_url, sent_body)


# --- InPost -----------------------------------------------------------------------------------


def test_inpost_group_signature_with_an_iso_timestamp() -> None:
    preset = PRESET_BY_NAME["inpost_group"]
    moment = "2023-11-14T22:13:20Z"
    assert datetime.fromisoformat(moment).timestamp() == NOW
    signature = b64(mac(preset.secrets[0], f"{moment}.".encode() + preset.body))
    request = make_request({"x-inpost-signature": signature, "x-inpost-timestamp": moment}, preset.body)
    assert preset.verifier().verify(request).ok
    assert_refused(
        preset.verifier().verify(dataclasses.replace(request, now=NOW + 301)), Reason.STALE_TIMESTAMP
    )
    garbled = with_headers(request, x_inpost_timestamp="14/11/2023 22:13")
    assert_refused(preset.verifier().verify(garbled), Reason.MALFORMED_TIMESTAMP)


def test_inpost_group_signature_without_a_timestamp_covers_the_body_alone() -> None:
    preset = PRESET_BY_NAME["inpost_group"]
    body_only = make_request({"x-inpost-signature": b64(mac(preset.secrets[0], preset.body))}, preset.body)
    assert preset.verifier().verify(body_only).ok
    # a timestamped signature stripped of its timestamp header no longer matches
    stripped = with_headers(preset.request(), x_inpost_timestamp=None)
    assert_refused(preset.verifier().verify(stripped), Reason.BAD_SIGNATURE)


def shipx(
    body: bytes = vectors.SHIPX_STATUS_CHANGED,
    url: str = "https://hooks.example.com/webhooks/inpost?token=shipx-token-1",
    method: str = "POST",
    client_ip: str = SHIPX_SENDER,
) -> WebhookRequest:
    return make_request(
        {"content-type": "application/json"}, body, url=url, method=method, client_ip=client_ip
    )


def test_shipx_answers_the_url_check_made_when_the_url_is_saved() -> None:
    verifier = make_verifier(scheme="inpost_shipx", secrets=["shipx-token-1"])
    verdict = verifier.verify(shipx(b"", method="GET"))
    assert verdict == Verdict(True, "handshake", answer=(200, b"OK", b"text/plain; charset=utf-8"))
    assert_refused(verifier.verify(shipx(b"", method="GET", client_ip=SENDER)), Reason.SENDER_NOT_ALLOWED)
    no_token = shipx(b"", method="GET", url="https://hooks.example.com/webhooks/inpost")
    assert_refused(verifier.verify(no_token), Reason.MISSING_TOKEN)


def test_shipx_events_carry_a_composite_id() -> None:
    verifier = make_verifier(scheme="inpost_shipx", secrets=["shipx-token-1"])
    verdict = verifier.verify(shipx())
    assert verdict == Verdict(
        True,
        "ok",
        event_id="shipment_status_changed:49:delivered:2020-03-20 15:08:42 +0100",
        event_type="shipment_status_changed",
    )
    confirmed = verifier.verify(shipx(vectors.SHIPX_CONFIRMED))
    assert (confirmed.event_id, confirmed.event_type) == (
        "shipment_confirmed:49:2020-03-20 15:08:06 +0100",
        "shipment_confirmed",
    )
    assert verifier.verify(shipx(b"not json")) == Verdict(True, "ok")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://hooks.example.com/webhooks/inpost?token=shipx-token-0", Reason.BAD_TOKEN),
        ("https://hooks.example.com/webhooks/inpost?token=", Reason.MISSING_TOKEN),
        ("https://hooks.example.com/webhooks/inpost?other=shipx-token-1", Reason.MISSING_TOKEN),
        ("https://hooks.example.com/webhooks/inpost?token=%ff%fe", Reason.BAD_TOKEN),
        ("https://hooks.example.com/webhooks/inpost?token=" + "x" * 10_000, Reason.BAD_TOKEN),
        ("https://hooks.example.com/webhooks/inpost/shipx-token-1", Reason.MISSING_TOKEN),
    ],
)
def test_shipx_refuses_a_missing_or_wrong_token(url: str, reason: Reason) -> None:
    verifier = make_verifier(scheme="inpost_shipx", secrets=["shipx-token-1"])
    assert_refused(verifier.verify(shipx(url=url)), reason, "shipx-token-1")


def test_shipx_tokens_rotate_and_may_sit_in_the_path() -> None:
    rotating = make_verifier(
        scheme="inpost_shipx", secrets=["shipx-token-1", "shipx-token-2"], token_param="key"
    )
    assert rotating.verify(shipx(url="https://h.example/in?key=shipx-token-1")).ok
    assert rotating.verify(shipx(url="https://h.example/in?key=shipx-token-2")).ok
    in_path = make_verifier(scheme="inpost_shipx", secrets=["shipx-token-1"], token_in="path")
    assert in_path.verify(shipx(url="https://h.example/webhooks/inpost/shipx-token-1")).ok
    assert in_path.verify(shipx(url="https://h.example/webhooks/inpost/shipx-token-1/")).ok
    assert_refused(in_path.verify(shipx(url="https://h.example/webhooks/inpost/nope")), Reason.BAD_TOKEN)


def test_shipx_sender_range_is_inposts_unless_overridden() -> None:
    default = make_verifier(scheme="inpost_shipx", secrets=["shipx-token-1"])
    assert default.verify(shipx(client_ip="91.216.25.255")).ok
    assert_refused(default.verify(shipx(client_ip="91.216.26.1")), Reason.SENDER_NOT_ALLOWED)
    moved = make_verifier(scheme="inpost_shipx", secrets=["shipx-token-1"], allowed_cidrs=["192.0.2.0/24"])
    assert moved.verify(shipx(client_ip="192.0.2.10")).ok
    assert_refused(moved.verify(shipx()), Reason.SENDER_NOT_ALLOWED)


# --- shared secrets ---------------------------------------------------------------------------


def test_token_header() -> None:
    verifier = make_verifier(scheme="token", secrets=["tok-old", "tok-new"])
    assert verifier.verify(make_request({"x-webhook-token": "tok-old"})).ok
    assert verifier.verify(make_request({"x-webhook-token": " tok-new "})).ok
    assert_refused(
        verifier.verify(make_request({"x-webhook-token": "tok-older"})), Reason.BAD_TOKEN, "tok-old"
    )
    assert_refused(verifier.verify(make_request({})), Reason.MISSING_TOKEN)
    assert_refused(verifier.verify(make_request({"x-webhook-token": "\xff" * 9000})), Reason.BAD_TOKEN)
    bearer = make_verifier(scheme="token", secrets=["tok-new"], header="Authorization", prefix="Bearer ")
    assert bearer.verify(make_request({"authorization": "Bearer tok-new"})).ok
    assert_refused(bearer.verify(make_request({"authorization": "tok-new"})), Reason.BAD_TOKEN)


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + b64(f"{user}:{password}".encode())}


def test_basic_credentials() -> None:
    verifier = make_verifier(scheme="basic", username="inpost", secrets=["pass-old", "pass-new"])
    assert verifier.verify(make_request(basic("inpost", "pass-old"))).ok
    assert verifier.verify(make_request(basic("inpost", "pass-new"))).ok
    assert verifier.verify(make_request({"authorization": "basic " + b64(b"inpost:pass-new")})).ok
    assert_refused(verifier.verify(make_request(basic("inpost", "pass"))), Reason.BAD_CREDENTIALS, "pass-old")
    assert_refused(verifier.verify(make_request(basic("other", "pass-new"))), Reason.BAD_CREDENTIALS)
    assert_refused(verifier.verify(make_request({})), Reason.MISSING_CREDENTIALS)
    assert_refused(verifier.verify(make_request({"authorization": "Bearer x"})), Reason.MISSING_CREDENTIALS)
    assert_refused(
        verifier.verify(make_request({"authorization": "Basic %%%"})), Reason.MALFORMED_CREDENTIALS
    )


# --- generic HMAC -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "encoding", "prefix"),
    [("sha1", "hex", ""), ("sha256", "base64", "hmac "), ("sha512", "hex", "sha512=")],
)
def test_generic_hmac_over_the_body(algorithm: str, encoding: str, prefix: str) -> None:
    config = {"scheme": "hmac", "secrets": ["s3cret"], "header": "X-Sig", "algorithm": algorithm}
    verifier = make_verifier(**config, encoding=encoding, prefix=prefix)
    digest = mac("s3cret", b"payload", algorithm)
    value = prefix + (digest.hex() if encoding == "hex" else b64(digest))
    assert verifier.verify(make_request({"x-sig": value}, b"payload")).ok
    assert_refused(verifier.verify(make_request({"x-sig": value}, b"payloaD")), Reason.BAD_SIGNATURE)
    assert_refused(
        verifier.verify(make_request({"x-sig": "x" + value}, b"payload")), Reason.MALFORMED_SIGNATURE
    )


def test_generic_hmac_template_with_literal_braces_and_milliseconds() -> None:
    verifier = make_verifier(
        scheme="hmac",
        secrets=["s3cret"],
        header="X-Sig",
        signed_content="{{v2}}|{timestamp}|{body}",
        timestamp_header="X-Sent-At",
        timestamp_format="unix_ms",
        tolerance="30s",
    )
    sent_at = str(NOW * 1000 - 29_000)
    value = mac("s3cret", f"{{v2}}|{sent_at}|".encode() + b"{}").hex()
    request = make_request({"x-sig": value, "x-sent-at": sent_at}, b"{}")
    assert verifier.verify(request).ok
    assert_refused(verifier.verify(dataclasses.replace(request, now=NOW + 2)), Reason.STALE_TIMESTAMP)


@pytest.mark.parametrize(
    ("changes", "complaint"),
    [
        ({"signed_content": "{timestamp}"}, "must contain {body}"),
        ({"signed_content": "{timestamp}.{body}"}, "go together"),
        ({"timestamp_header": "X-T"}, "go together"),
        ({"signed_content": "{id}.{body}"}, "needs id_header"),
        ({"signed_content": "{foo}.{body}"}, "unknown placeholder"),
        ({"signed_content": "{body!r}"}, "unknown placeholder"),
        ({"signed_content": "{body"}, "signed_content"),
        ({"algorithm": "md5"}, "algorithm"),
        ({"header": "X Sig"}, "not a valid header name"),
        ({"tolerance": 0}, "tolerance"),
    ],
)
def test_generic_hmac_config_errors(changes: dict[str, Any], complaint: str) -> None:
    config = {"scheme": "hmac", "secrets": ["s3cret"], "header": "X-Sig", **changes}
    with pytest.raises(ValidationError, match=re.escape(complaint)):
        SCHEMES.validate_python(config)


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        ({"scheme": "stripe", "secrets": []}, "at least 1 item"),
        ({"scheme": "stripe", "secrets": [""]}, "cannot be empty"),
        ({"scheme": "stripe"}, "secrets"),
        ({"scheme": "stripe", "secrets": ["whsec_x"], "tolerance": "5 fortnights"}, "duration"),
        ({"scheme": "github", "secrets": ["x"], "unknown": 1}, "Extra inputs are not permitted"),
        ({"scheme": "nope", "secrets": ["x"]}, "does not match any of the expected tags"),
        ({"scheme": "github", "secrets": ["x"], "allowed_cidrs": ["10.0.0.1/8"]}, "allowed_cidrs"),
        ({"scheme": "github", "secrets": ["x"], "id_json_path": "a..b"}, "id_json_path"),
        ({"scheme": "standard"}, "give secrets"),
        ({"scheme": "standard", "secrets": ["whsec_not*base64"]}, "whsec_ followed by base64"),
        ({"scheme": "standard", "public_keys": ["whpk_" + b64(b"short")]}, "32 bytes"),
        ({"scheme": "basic", "username": "a:b", "secrets": ["x"]}, "cannot contain ':'"),
    ],
)
def test_config_errors(config: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(complaint)):
        SCHEMES.validate_python(config)


def test_validation_errors_do_not_echo_the_secrets() -> None:
    with pytest.raises(ValidationError) as raised:
        StandardWebhooksConfig.model_validate({"scheme": "standard", "secrets": ["whsec_not*base64"]})
    assert "not*base64" not in str(raised.value)


def test_configs_are_frozen_and_mask_secrets() -> None:
    config = SCHEMES.validate_python({"scheme": "stripe", "secrets": ["whsec_visible"], "tolerance": "5m"})
    assert config.tolerance == 300
    with pytest.raises(ValidationError):
        config.tolerance = 1
    assert "whsec_visible" not in repr(config)
    assert "whsec_visible" not in config.model_dump_json()


# --- the Pactown gateway's shorthands -------------------------------------------------------


@pytest.mark.parametrize(
    ("shorthand", "provider", "scheme", "variable"),
    [
        ("webhook_secret", "allegro", "allegro", "ALLEGRO_WEBHOOK_SECRET"),
        ("hmac_sha256", "inpost", "inpost", "INPOST_WEBHOOK_SECRET"),
        ("stripe_signature", "stripe", "stripe", "STRIPE_WEBHOOK_SECRET"),
    ],
)
def test_pactown_shorthands_read_the_pactown_environment(
    shorthand: str, provider: str, scheme: str, variable: str
) -> None:
    config = shorthand_scheme(shorthand, PACTOWN_ENV)
    assert config is not None and config.scheme == scheme
    body = b'{"id": "evt_1", "type": "ping"}'
    request = make_request(pactown_signature(provider, body, PACTOWN_ENV[variable], NOW), body)
    assert build_verifier(config).verify(request).ok

    given = shorthand_scheme(shorthand, PACTOWN_ENV, secrets=["route-secret"])
    assert given is not None
    assert_refused(build_verifier(given).verify(request), Reason.BAD_SIGNATURE)
    with pytest.raises(ValueError, match=variable):
        shorthand_scheme(shorthand, {variable: ""})


def test_other_auth_values_are_not_webhook_shorthands() -> None:
    assert shorthand_scheme("jwt", PACTOWN_ENV) is None
    assert shorthand_scheme("", PACTOWN_ENV) is None
