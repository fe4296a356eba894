"""The `headers` policy: add, set, remove and rename request and response headers.

It is the header part of the `transform` policy under its own name (the same config model, the
same compiled edits, variables in values included): operations run in the order remove →
rename → set → add (as Kong's transformers do), so a rename can target a name that `remove`
cleared and `add` always appends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.registry import register
from apigate.policies.transform.build import header_edits
from apigate.policies.transform.config import HeaderEdits

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange


class HeadersConfig(PolicyConfig):
    request: HeaderEdits = HeaderEdits()
    response: HeaderEdits = HeaderEdits()


@register
class HeadersPolicy(Policy[HeadersConfig]):
    name = "headers"
    order = 5000
    phases = frozenset({"request", "response"})

    def prepare(self) -> None:
        self.request_edits = header_edits(self.config.request, self.route)
        self.response_edits = header_edits(self.config.response, self.route)
        # The engine calls the (compiled) edit methods directly: no Python frame per request.
        self.engine_hooks = {
            "request": self.request_edits.edit_request,
            "response": self.response_edits.edit_response,
        }

    # What the compiled hooks do, for callers other than the engine.
    def on_request(self, exchange: Exchange) -> None:
        self.request_edits.edit_request(exchange)

    def on_response(self, exchange: Exchange) -> None:
        self.response_edits.edit_response(exchange)
