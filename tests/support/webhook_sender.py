"""Send signed webhooks to a gateway the way GitHub does (HMAC-SHA256 of the body), over one
keep-alive connection, and say what the gateway answered."""

from __future__ import annotations

import hashlib
import hmac
import http.client

import orjson

SECRET = "test-webhook-secret-0123456789"


def github_source(destinations: list, **extra: object) -> dict:
    return {"verify": {"scheme": "github", "secrets": [SECRET]}, "destinations": destinations, **extra}


def signed_headers(
    body: bytes, delivery_id: str, event: str = "push", secret: str = SECRET
) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-GitHub-Delivery": delivery_id,
        "X-GitHub-Event": event,
        "X-Hub-Signature-256": f"sha256={digest}",
    }


class Sender:
    def __init__(self, port: int, path: str) -> None:
        self.port = port
        self.path = path
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
        self.conn.request("POST", self.path, body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        return response.status, (orjson.loads(data) if data else {})

    def send(self, delivery_id: str, payload: dict | None = None, event: str = "push") -> tuple[int, dict]:
        body = orjson.dumps(payload if payload is not None else {"id": delivery_id})
        return self.post(body, signed_headers(body, delivery_id, event))

    def close(self) -> None:
        self.conn.close()
