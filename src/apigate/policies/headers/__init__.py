"""The `headers` policy: add, set, remove and rename request and response headers.

Operations run in the order remove → rename → set → add (as Kong's transformers do), so a
rename can target a name that `remove` cleared and `add` always appends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field, field_validator

from apigate.config.headernames import check_header_name
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.registry import register

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange
    from apigate.services import Services


def _check_name(name: str) -> str:
    return check_header_name(name)


def _check_value(value: str) -> str:
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError("header values cannot contain CR, LF or NUL")
    return value


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
        return {_check_name(k): _check_value(v) for k, v in pairs.items()}


class HeadersConfig(PolicyConfig):
    request: HeaderEdits = HeaderEdits()
    response: HeaderEdits = HeaderEdits()


class CompiledEdits:
    """The edits as lowercase byte strings, applied to a header list in one comprehension."""

    __slots__ = ("appended", "drop", "empty", "rename")

    def __init__(self, edits: HeaderEdits) -> None:
        self.rename = {a.lower().encode(): b.lower().encode() for a, b in edits.rename.items()}
        set_pairs = [(k.lower().encode(), v.encode()) for k, v in edits.set.items()]
        add_pairs = [(k.lower().encode(), v.encode()) for k, v in edits.add.items()]
        # "set" is "drop every old value, then append"; "add" only appends.
        self.appended = set_pairs + add_pairs
        self.drop = frozenset(n.lower().encode() for n in edits.remove) | {k for k, _ in set_pairs}
        self.empty = not (self.rename or self.appended or self.drop)

    def apply(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        drop = self.drop
        if self.rename:
            rename = self.rename
            out = [(rename.get(name, name), value) for name, value in headers if name not in drop]
        else:
            out = [pair for pair in headers if pair[0] not in drop]
        if self.appended:
            out += self.appended
        return out


@register
class HeadersPolicy(Policy):
    name: ClassVar[str] = "headers"
    order: ClassVar[int] = 5000
    Config: ClassVar[type[PolicyConfig]] = HeadersConfig

    def __init__(self, config: HeadersConfig, services: Services | None = None) -> None:
        super().__init__(config, services)
        self.request_edits = CompiledEdits(config.request)
        self.response_edits = CompiledEdits(config.response)

    def on_request(self, exchange: Exchange) -> None:
        if not self.request_edits.empty:
            exchange.headers = self.request_edits.apply(exchange.headers)

    def on_response(self, exchange: Exchange) -> None:
        if not self.response_edits.empty:
            exchange.response_headers = self.response_edits.apply(exchange.response_headers)
