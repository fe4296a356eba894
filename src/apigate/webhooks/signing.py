"""The gateway's own Standard Webhooks signature on what it delivers, so handlers can verify it.

``webhook-signature: v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">``, keyed
with the base64-decoded part of a ``whsec_`` secret (as the standardwebhooks libraries expect).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from apigate.webhooks.config import signing_key

SECRET_SETTING = "webhooks.signing_secret"


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


class Signer:
    def __init__(self, secret: str) -> None:
        self._key = signing_key(secret)

    def headers(self, message_id: str, timestamp: int, body: bytes) -> list[tuple[bytes, bytes]]:
        signed = b"%s.%d.%s" % (message_id.encode(), timestamp, body)
        digest = base64.b64encode(hmac.new(self._key, signed, hashlib.sha256).digest())
        return [
            (b"webhook-id", message_id.encode()),
            (b"webhook-timestamp", b"%d" % timestamp),
            (b"webhook-signature", b"v1," + digest),
        ]
