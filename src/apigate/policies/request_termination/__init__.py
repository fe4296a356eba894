"""The `request-termination` policy: answer every request with a fixed status and message.

For routes that must not reach an upstream (maintenance, a retired API version, a path kept
closed), as Kong's plugin of the same name. The gateway also puts it on a route whose ``auth:``
shorthand it cannot honour, so that such a route refuses traffic instead of serving it
unauthenticated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from apigate.engine.replies import Reply, json_reply
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.registry import register

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange


class RequestTerminationConfig(PolicyConfig):
    status: int = Field(default=503, ge=200, le=599)
    message: str = Field(default="this route is not available", max_length=1000)
    reason: str = Field(
        default="terminated", pattern=r"^[a-z0-9_]{1,64}$", description="machine-readable code"
    )


@register
class RequestTermination(Policy[RequestTerminationConfig]):
    name = "request-termination"
    order = 100  # before authentication: nothing is checked for a closed route
    phases = frozenset({"request"})
    terminal = True

    def prepare(self) -> None:
        self.status = self.config.status
        self.payload = {"error": self.config.message, "reason": self.config.reason}

    def on_request(self, exchange: Exchange) -> Reply:
        return json_reply(self.status, {**self.payload, "request_id": exchange.request_id})
