"""What a policy is: a config model, a name, an order and hooks for the phases of a request.

The engine calls only the hooks a policy overrides, so an unused phase costs nothing.
Phases, in the order a request meets them:

- ``on_request(exchange)``: after the route matched, before the upstream is chosen. Returns
  ``None`` to continue, a ``Reply`` to answer early (401, 429, a cached response...), or an
  awaitable of either when it must wait (a Redis decision, a JWKS fetch, a leaky-bucket
  delay). Answer from memory synchronously when you can: only an awaitable costs a task.
  ``async def`` works too, but then every request pays for a coroutine and a task.
- ``on_body(exchange, body)``: the whole request body, exactly as the client sent it (chunked
  framing removed). Declaring this hook makes the engine buffer the body, up to the policy's
  ``body_limit`` (larger bodies get 413), once every ``on_request`` hook has passed; the others
  stream. Same return values as ``on_request``. A hook may replace ``exchange.body``: the
  upstream then receives the new bytes with a matching Content-Length.
- ``on_response(exchange)``: the upstream's status and headers arrived; edit
  ``exchange.response_headers`` before they are sent. Runs in reverse order.
- ``on_log(exchange)``: the exchange is finished (status, timings, bytes are known).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from apigate.engine.exchange import Exchange
    from apigate.engine.replies import Reply
    from apigate.services import Services


class PolicyConfig(BaseModel):
    """Base for policy config models: unknown keys are errors, values are frozen once compiled."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Policy:
    name: ClassVar[str]
    order: ClassVar[int]
    """Request hooks run in ascending order (auth ~1000, limits ~2000, transforms ~5000)."""
    Config: ClassVar[type[PolicyConfig]]
    challenge: bytes | None = None
    """An authentication policy's WWW-Authenticate value for a missing credential (others: None)."""
    needs: ClassVar[frozenset[str]] = frozenset()
    """Shared services the policy uses, e.g. {"consumers"}; the gateway starts them before serving."""
    terminal: ClassVar[bool] = False
    """The policy always answers itself (a token endpoint, a webhook intake): its route needs no upstream."""
    shorthand: ClassVar[str | None] = None
    """The route key this policy also answers to (``rate_limit: 100/min``, ``auth: stripe_signature``,
    see ``ROUTE_SHORTHANDS``); ``expand_shorthand`` turns the key's value into the policy's config."""
    body_limit: ClassVar[int] = 1 << 20
    """Largest request body ``on_body`` accepts; the route's ``max_body_size`` may lower it."""
    reads_body = True
    """False when this instance's config turns its ``on_body`` check off (bodies then stream)."""

    def __init__(self, config: Any, services: Services | None = None) -> None:
        self.config = config
        self.services = services

    @classmethod
    def expand_shorthand(cls, value: str) -> dict[str, Any] | None:
        """This policy's raw config for the route's ``shorthand: value``; None when ``value`` is not
        for this policy. A ValueError means it is, but cannot be honoured (a secret is unset, say):
        the shorthand is then reported inactive."""
        return None

    def on_request(self, exchange: Exchange) -> Reply | Awaitable[Reply | None] | None:
        return None

    def on_body(self, exchange: Exchange, body: bytes) -> Reply | Awaitable[Reply | None] | None:
        return None

    def on_response(self, exchange: Exchange) -> None:
        return None

    def on_log(self, exchange: Exchange) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        """What /routes shows of this policy; secrets stay masked."""
        return self.config.model_dump(mode="json")
