"""An exchange as one JSON line: the fields, the sampling of successes, and what is never written.

Runs on the event loop for every finished exchange: it reads plain attributes, builds one dict
and hands ``orjson.dumps`` of it to the writer's queue. Credentials never reach a line: no
header is written unless listed, and a listed header named like a secret is redacted; the
query is dropped unless kept, and then the values of parameters named like a secret (or shaped
like a JWT) are redacted; so is a JWT in the path.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote_to_bytes

import orjson

from apigate.config.accesslog import CREDENTIAL_HEADERS, FIELDS, SECRET_NAME_PARTS, AccessLogConfig

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

REDACTED: Final = "[redacted]"
_REDACTED_BYTES: Final = REDACTED.encode()
# A JWT or JWS in compact form: base64url header starting with '{"' (eyJ), then two more parts.
_JWT_SHAPE: Final = re.compile(rb"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
_JWT_IN_TEXT: Final = re.compile(_JWT_SHAPE.pattern.decode())
_LONGEST_ID: Final = 256  # an identity claim longer than this is cut (it is not ours to trust)
_LONGEST_HEADER: Final = 1024  # a logged header value longer than this is cut


class Clock:
    """RFC 3339 UTC times with milliseconds; the seconds part is formatted once per second."""

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def format(self, wall: float) -> str:
        second = int(wall)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.prefix}.{int((wall - second) * 1000):03d}Z"


class LineMaker:
    """Makes the line of a finished exchange and hands it to ``put``; successes are sampled."""

    def __init__(
        self,
        config: AccessLogConfig,
        put: Callable[[bytes], None],
        secret_params: Iterable[str] = (),
        secret_headers: Iterable[str] = (),
        chance: Callable[[], float] = random.random,
    ) -> None:
        """``secret_params`` and ``secret_headers``: more names to redact (those the config's
        policies read credentials from)."""
        self.put = put
        self.chance = chance
        self.sample = config.sample
        self.keep_query = config.query == "keep"
        self.fields = None if config.fields == FIELDS else config.fields
        self.headers = config.headers
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
        self.clock = Clock()

    def __call__(self, exchange: Exchange) -> None:
        status = exchange.response_status
        if (
            self.sample < 1.0
            and 0 < status < 400
            and exchange.failure is None
            and self.chance() >= self.sample
        ):
            return
        # (``default=str``: a plugin's value of another type is written as text, not an error.)
        self.put(orjson.dumps(self.record(exchange), default=str, option=orjson.OPT_APPEND_NEWLINE))

    def record(self, exchange: Exchange) -> dict[str, Any]:
        """The line's fields, in their order."""
        now = time.time()
        start = exchange.t_start
        end = exchange.t_end or start
        first_byte = exchange.t_first_byte
        attempt_began = exchange.t_attempt
        state = exchange.state
        target = exchange.target
        route = exchange.route
        query = exchange.query
        path = exchange.path
        if "eyJ" in path:  # a token in the path (a magic link): one substring test per request
            path = _JWT_IN_TEXT.sub(REDACTED, path)
        if query and self.keep_query:
            path = f"{path}?{self.redact_query(query)}"
        record = {
            "time": self.clock.format(now - (end - start)),
            "request_id": exchange.request_id,
            "trace_id": exchange.trace_id.decode(),
            "client_ip": exchange.client_ip,
            "method": exchange.method,
            "path": path,
            "route": route.name if route is not None else None,
            "status": exchange.response_status,
            "duration_ms": int((end - start) * 1_000_000.0) / 1000,  # (cheaper than round)
            "upstream_ms": (
                int((first_byte - attempt_began) * 1_000_000.0) / 1000
                if first_byte and attempt_began and first_byte >= attempt_began
                else None
            ),
            "bytes_in": exchange.bytes_in,
            "bytes_out": exchange.bytes_out,
            "consumer": exchange.consumer_id(),
            "tenant": exchange.tenant,
            "key_id": state.get("key_id") if state else None,
            "user_id": _subject(state.get("claims")) if state else None,
            "limited": state.get("limited") if state else None,
            "cache": None,  # no response cache yet
            "attempts": exchange.attempt,
            "tried": exchange.tried,
            "upstream": f"{target.host}:{target.port}" if target is not None else None,
            "error": exchange.failure,
        }
        fields = self.fields
        if fields is not None:
            record = {name: record[name] for name in fields}
        if self.headers:
            record["headers"] = self.request_headers(exchange.headers)
        return record

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


def _subject(claims: Mapping[str, Any] | None) -> str | None:
    """The ``sub`` claim a jwt or oauth2-introspection policy kept, when it is a string."""
    if claims is None:
        return None
    subject = claims.get("sub")
    return subject[:_LONGEST_ID] if isinstance(subject, str) else None
