"""Policies of a test's own, loaded through ``plugins:``, that exercise the engine's body phase."""

from __future__ import annotations

import asyncio
import hashlib
from typing import ClassVar

from apigate.engine.exchange import Exchange
from apigate.engine.replies import Reply, json_reply
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.registry import register


class DigestConfig(PolicyConfig):
    limit: int = 1 << 20


@register
class BodyDigest(Policy):
    """Answers every request itself with the length and SHA-256 of the body it received."""

    name = "test_body_digest"
    order = 1000
    Config = DigestConfig
    phases = frozenset({"body"})
    terminal = True
    body_limit: ClassVar[int] = 256 * 1024

    def on_body(self, exchange: Exchange, body: bytes) -> Reply:
        return json_reply(200, {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()})


class NoConfig(PolicyConfig):
    pass


@register
class BodyUpper(Policy):
    """Rewrites the body before it goes upstream (its length changes when it ends in a marker)."""

    name = "test_body_upper"
    order = 1000
    Config = NoConfig
    phases = frozenset({"body"})

    def on_body(self, exchange: Exchange, body: bytes) -> None:
        exchange.body = body.upper() + (b"-grown" if body.endswith(b"grow") else b"")


@register
class BodyGate(Policy):
    """Waits (as a policy making a network call would), then refuses bodies that contain 'deny'."""

    name = "test_body_gate"
    order = 2000
    Config = NoConfig
    phases = frozenset({"body"})

    async def _decide(self, body: bytes) -> Reply | None:
        await asyncio.sleep(0)
        return json_reply(403, {"error": "denied by body"}) if b"deny" in body.lower() else None

    def on_body(self, exchange: Exchange, body: bytes) -> asyncio.Future[Reply | None]:
        return asyncio.ensure_future(self._decide(body))
