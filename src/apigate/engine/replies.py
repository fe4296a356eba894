"""Answers the gateway makes itself: errors, policies' early answers, the built-in endpoints."""

from __future__ import annotations

from typing import Any

import orjson


class Reply:
    """An answer made by the gateway itself (an error, a policy's early answer, a built-in endpoint)."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        content_type: bytes = b"application/json",
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers or []
        self.content_type = content_type


def json_reply(status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None) -> Reply:
    return Reply(status, orjson.dumps(payload), headers)


def error_body(message: str, request_id: str, reason: str | None = None) -> bytes:
    """The JSON body of every error the gateway makes; ``reason`` is a stable code for programs."""
    if reason is None:
        return orjson.dumps({"error": message, "request_id": request_id})
    return orjson.dumps({"error": message, "reason": reason, "request_id": request_id})
