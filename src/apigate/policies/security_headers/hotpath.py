"""The `security-headers` policy's per-response work, kept free of pydantic so that mypyc can
compile it.

The fields arrive as lowercase byte pairs built once from the config. The usual response has
none of them yet: one scan finds that, and the fields are appended in place.
"""

from __future__ import annotations

from apigate.engine.exchange import Exchange


class SecurityFields:
    """The fields every response of the route gets: added where the response lacks them, or, with
    ``override``, in place of the response's own."""

    def __init__(self, fields: list[tuple[bytes, bytes]], override: bool) -> None:
        self.fields = fields
        self.names: frozenset[bytes] = frozenset(name for name, _ in fields)
        self.override = override

    def on_response(self, exchange: Exchange) -> None:
        headers = exchange.response_headers
        names = self.names
        found = False
        for pair in headers:
            if pair[0] in names:
                found = True
                break
        if not found:
            headers += self.fields
        elif self.override:
            kept = [pair for pair in headers if pair[0] not in names]
            kept += self.fields
            exchange.response_headers = kept
        else:
            present = {pair[0] for pair in headers if pair[0] in names}
            headers += [field for field in self.fields if field[0] not in present]
