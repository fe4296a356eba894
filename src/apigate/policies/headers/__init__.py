"""The `headers` policy: add, set, remove and rename request and response headers.

Operations run in the order remove → rename → set → add (as Kong's transformers do), so a
rename can target a name that `remove` cleared and `add` always appends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from apigate.config.headernames import check_header_name, check_header_value
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.headers.hotpath import CompiledEdits
from apigate.policies.registry import register

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange


def _check_name(name: str) -> str:
    return check_header_name(name)


class HeaderEdits(PolicyConfig):
    remove: list[str] = Field(default_factory=list)
    rename: dict[str, str] = Field(default_factory=dict)
    set: dict[str, str] = Field(default_factory=dict, description="replace or add")
    add: dict[str, str] = Field(default_factory=dict, description="append, keeping existing values")

    @field_validator("remove")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        return [_check_name(n) for n in names]

    @field_validator("rename")
    @classmethod
    def _renames(cls, pairs: dict[str, str]) -> dict[str, str]:
        return {_check_name(a): _check_name(b) for a, b in pairs.items()}

    @field_validator("set", "add")
    @classmethod
    def _values(cls, pairs: dict[str, str]) -> dict[str, str]:
        return {_check_name(k): check_header_value(v) for k, v in pairs.items()}


class HeadersConfig(PolicyConfig):
    request: HeaderEdits = HeaderEdits()
    response: HeaderEdits = HeaderEdits()


@register
class HeadersPolicy(Policy[HeadersConfig]):
    name = "headers"
    order = 5000
    phases = frozenset({"request", "response"})

    def prepare(self) -> None:
        self.request_edits = _compile(self.config.request)
        self.response_edits = _compile(self.config.response)
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


def _compile(edits: HeaderEdits) -> CompiledEdits:
    return CompiledEdits(list(edits.remove), dict(edits.rename), dict(edits.set), dict(edits.add))
