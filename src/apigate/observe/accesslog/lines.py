"""An exchange as one JSON line: the fields, the sampling of successes, and what is never written.

The settings and the redaction rules live here; the per-request work (reading the exchange into a
record for the writer's buffer) is hotpath.py's, compiled, and the lines are made from the
records a batch at a time (render.py).
Credentials never reach a line: no header is written unless listed, and a listed header named
like a secret is redacted; the query is dropped unless kept, and then the values of parameters
named like a secret (or shaped like a JWT) are redacted; so is a JWT in the path.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote_to_bytes

import orjson

from apigate.config.accesslog import CREDENTIAL_HEADERS, FIELDS, SECRET_NAME_PARTS, AccessLogConfig
from apigate.observe.accesslog.hotpath import LineBuffer, Lines, lines_of

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

REDACTED: Final = "[redacted]"
_REDACTED_BYTES: Final = REDACTED.encode()
# A JWT or JWS in compact form: base64url header starting with '{"' (eyJ), then two more parts.
_JWT_SHAPE: Final = re.compile(rb"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
_JWT_IN_TEXT: Final = re.compile(_JWT_SHAPE.pattern.decode())
_LONGEST_ID: Final = 256  # an identity claim longer than this is cut (it is not ours to trust)
_LONGEST_HEADER: Final = 1024  # a logged header value longer than this is cut


class LineMaker:
    """Makes the line of a finished exchange and puts it in ``buffer``; successes are sampled."""

    def __init__(
        self,
        config: AccessLogConfig,
        buffer: LineBuffer,
        secret_params: Iterable[str] = (),
        secret_headers: Iterable[str] = (),
        chance: Callable[[], float] = random.random,
    ) -> None:
        """``secret_params`` and ``secret_headers``: more names to redact (those the config's
        policies read credentials from)."""
        self.chance = chance
        self.sample = config.sample
        self.keep_query = config.query == "keep"
        self.headers = config.headers
        self.fields = config.fields
        self.name_parts = (*SECRET_NAME_PARTS, *config.redact_params)
        self.exact_params = frozenset(name.lower() for name in secret_params)
        exact_headers = (
            CREDENTIAL_HEADERS | set(config.sensitive_headers) | {name.lower() for name in secret_headers}
        )
        self.redacted_headers = frozenset(
            name
            for name in config.headers
            if name in exact_headers or any(part in name for part in self.name_parts)
        )
        # The per-request work, compiled (hotpath.py); the engine calls it directly.
        self.lines = Lines(
            buffer,
            self.sample,
            chance,
            None if config.fields == FIELDS else self.choose,
            self.keep_query,
            self.redact_query,
            _redact_path,
            _subject,
            self.request_headers if self.headers else None,
            not config.omit_empty,
        )

    def __call__(self, exchange: Exchange) -> None:
        self.lines(exchange)

    def record(self, exchange: Exchange) -> dict[str, Any]:
        """The line's fields, in their order."""
        record: dict[str, Any] = orjson.loads(lines_of([self.lines.record(exchange)]))
        return record

    def choose(self, line: bytes) -> bytes:
        """The line of the chosen fields, in their order, from the line of all of them (a choice
        of fields is rarer than the default and may cost more; one way of making lines)."""
        whole = orjson.loads(line)
        chosen = {name: whole[name] for name in self.fields if name in whole}
        if self.headers:
            chosen["headers"] = whole["headers"]
        return orjson.dumps(chosen, option=orjson.OPT_APPEND_NEWLINE)

    def request_headers(self, headers: list[tuple[bytes, bytes]]) -> dict[str, str | None]:
        """The listed request headers (first value each), credentials redacted."""
        found: dict[str, str | None] = dict.fromkeys(self.headers)
        for name, value in headers:
            key = name.decode("latin-1")
            if key in found and found[key] is None:
                found[key] = (
                    REDACTED if key in self.redacted_headers else value[:_LONGEST_HEADER].decode("latin-1")
                )
        return found

    def redact_query(self, query: bytes) -> str:
        """The query with the values of secret-looking parameters, and of JWT-shaped values, redacted."""
        pieces = []
        for piece in query.split(b"&"):
            name, equals, value = piece.partition(b"=")
            if equals and (self.secret_param(name) or _JWT_SHAPE.search(unquote_to_bytes(value))):
                piece = name + b"=" + _REDACTED_BYTES
            elif not equals and _JWT_SHAPE.search(unquote_to_bytes(name)):
                piece = _REDACTED_BYTES
            pieces.append(piece)
        return b"&".join(pieces).decode("latin-1")

    def secret_param(self, raw_name: bytes) -> bool:
        name = unquote_to_bytes(raw_name.replace(b"+", b" ")).decode("latin-1").lower()
        return name in self.exact_params or any(part in name for part in self.name_parts)


def _redact_path(path: str) -> str:
    return _JWT_IN_TEXT.sub(REDACTED, path)


def _subject(claims: Mapping[str, Any] | None) -> str | None:
    """The ``sub`` claim a jwt or oauth2-introspection policy kept, when it is a string."""
    if claims is None:
        return None
    subject = claims.get("sub")
    return subject[:_LONGEST_ID] if isinstance(subject, str) else None
