"""Signature vectors published by the providers (or their official SDKs' own tests), byte for byte."""

from __future__ import annotations

# GitHub docs, "Validating webhook deliveries".
GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_PAYLOAD = b"Hello, World!"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

# standard-webhooks repository: libraries/python/tests/test_webhooks.py (test_sign_function).
STANDARD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
STANDARD_MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
STANDARD_TIMESTAMP = 1614265330
STANDARD_PAYLOAD = b'{"test": 2432232314}'
STANDARD_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
# Same repository, libraries/go/webhook_asymmetric_test.go (TestAsymmetricWebhookSign): the
# Ed25519 private key's seed, base64; same message id, timestamp and payload as above.
STANDARD_ED25519_SEED = "VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk="
STANDARD_ED25519_SIGNATURE = (
    "v1a,tQ9V2XOqn7jL/DQenEFpqIugdBVtiMmER5mhSkXBNwM0mkATuDe6KYYUuxqtaiHeYGb7KaaBRdM5WqyeFiL8Ag=="
)

# Slack docs, "Verifying requests from Slack".
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
SLACK_TIMESTAMP = 1531420618
SLACK_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
    b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
    b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)
SLACK_SIGNATURE = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"

# twilio-python: tests/unit/test_request_validator.py.
TWILIO_TOKEN = "12345"
TWILIO_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
    "Caller": "+14158675309",
}
TWILIO_SIGNATURE = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
TWILIO_SIGNATURE_HTTPS_PORT_443 = "kvajT1Ptam85bY51eRf/AJRuM3w="
TWILIO_SIGNATURE_HTTP_PORT_80 = "0ZXoZLH/DfblKGATFgpif+LLRf4="
TWILIO_SIGNATURE_HTTP_PORT_1234 = "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
TWILIO_JSON_BODY = b'{"property": "value", "boolean": true}'
TWILIO_BODY_SHA256 = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"
TWILIO_JSON_SIGNATURE = "a9nBmqA0ju/hNViExpshrM61xv4="
TWILIO_DUPLICATES_BODY = b"Sid=CA123&SidAccount=AC123&Digits=5678&Digits=1234"
TWILIO_DUPLICATES_SIGNATURE = "IK+Dwps556ElfBT0I3Rgjkr1wJU="

# InPost ShipX docs: a shipment_status_changed webhook body.
SHIPX_STATUS_CHANGED = (
    b'{"event_ts": "2020-03-20 15:08:42 +0100", "event": "shipment_status_changed", "organization_id": 1,'
    b' "payload": {"shipment_id": 49, "status": "delivered", "tracking_number": "602677439331630337653846"}}'
)
SHIPX_CONFIRMED = (
    b'{"event_ts": "2020-03-20 15:08:06 +0100", "event": "shipment_confirmed", "organization_id": 1,'
    b' "payload": {"shipment_id": 49, "tracking_number": "602677439331630337653846"}}'
)
