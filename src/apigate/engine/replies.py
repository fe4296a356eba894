"""Answers the gateway makes itself: errors, policies' early answers, the built-in endpoints."""

from __future__ import annotations

from typing import Any

import orjson


class Reply:
    """An answer made by the gateway itself (an error, a policy's early answer, a built-in endpoint)."""

    __slots__ = ("body", "content_type", "headers", "reason", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        content_type: bytes = b"application/json",
        reason: str | None = None,
    ) -> None:
        """``reason``: the stable code of a refusal (metrics count authentication failures by it)."""
        self.status = status
        self.body = body
        self.headers = headers or []
        self.content_type = content_type
        self.reason = reason


def json_reply(status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None) -> Reply:
    """A JSON answer; a ``reason`` in the payload becomes the reply's reason."""
    reason = payload.get("reason") if isinstance(payload, dict) else None
    return Reply(status, orjson.dumps(payload), headers, reason=reason if isinstance(reason, str) else None)


def error_body(message: str, request_id: str, reason: str | None = None) -> bytes:
    """The JSON body of every error the gateway makes; ``reason`` is a stable code for programs."""
    if reason is None:
        return orjson.dumps({"error": message, "request_id": request_id})
    return orjson.dumps({"error": message, "reason": reason, "request_id": request_id})
