"""A policy of a test's own, loaded through ``plugins:``, that declares a route shorthand too:
``rate_limit: <value>`` becomes this policy for the values the built-in rate-limit does not take."""

from __future__ import annotations

from typing import Any, ClassVar

from apigate.engine.exchange import Exchange
from apigate.engine.replies import Reply, json_reply
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.registry import register


class LimitConfig(PolicyConfig):
    limit: str


@register
class DeclaredLimit(Policy):
    """Answers every request with the limit its route's shorthand gave it."""

    name = "test_declared_limit"
    order = 2000
    Config = LimitConfig
    phases = frozenset({"request"})
    shorthand: ClassVar[str | None] = "rate_limit"

    @classmethod
    def expand_shorthand(cls, value: str) -> dict[str, Any] | None:
        if value == "unlimited":
            raise ValueError("this policy cannot honour an unlimited rate")
        return {"limit": value}

    def on_request(self, exchange: Exchange) -> Reply:
        return json_reply(200, {"limit": self.config.limit})
