"""The `headers` policy's per-request work, kept free of pydantic so that mypyc can compile it.

The edits arrive as plain str names and values (validated by the config model) and are turned
into lowercase byte strings once; a request or response then costs one comprehension.
"""

from __future__ import annotations

from apigate.engine.exchange import Exchange


class CompiledEdits:
    """One direction's edits: remove → rename → set → add, applied to a header list at once."""

    __slots__ = ("appended", "drop", "empty", "rename")

    def __init__(
        self, remove: list[str], rename: dict[str, str], set: dict[str, str], add: dict[str, str]
    ) -> None:
        self.rename: dict[bytes, bytes] = {a.lower().encode(): b.lower().encode() for a, b in rename.items()}
        set_pairs = [(k.lower().encode(), v.encode()) for k, v in set.items()]
        add_pairs = [(k.lower().encode(), v.encode()) for k, v in add.items()]
        # "set" is "drop every old value, then append"; "add" only appends.
        self.appended: list[tuple[bytes, bytes]] = set_pairs + add_pairs
        self.drop: frozenset[bytes] = frozenset(n.lower().encode() for n in remove) | {
            k for k, _ in set_pairs
        }
        self.empty: bool = not (self.rename or self.appended or self.drop)

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

    # The hooks themselves: the policy hands these bound methods to the engine.
    def edit_request(self, exchange: Exchange) -> None:
        if not self.empty:
            exchange.headers = self.apply(exchange.headers)

    def edit_response(self, exchange: Exchange) -> None:
        if not self.empty:
            exchange.response_headers = self.apply(exchange.response_headers)
