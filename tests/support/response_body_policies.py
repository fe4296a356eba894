"""Policies of a test's own, loaded through ``plugins:``, that exercise the engine's response_body
phase: a filter that keeps the length, one that needs the whole body and gives up past a limit,
and ones that fail where a test says."""

from __future__ import annotations

from typing import Literal

from apigate.engine.exchange import Exchange
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.registry import register


class NoConfig(PolicyConfig):
    pass


def drop_length(exchange: Exchange) -> None:
    """The filter may change the body's length: the client then gets it chunked."""
    exchange.response_headers = [p for p in exchange.response_headers if p[0] != b"content-length"]


class UpperFilter:
    def feed(self, chunk: bytes) -> bytes:
        return chunk.upper()

    def end(self) -> bytes:
        return b""


@register
class ResponseUpper(Policy[NoConfig]):
    """Upper-cases the body as it streams (its length stays, so does Content-Length); says in
    ``X-Filter-Asked`` that the engine asked it."""

    name = "test_response_upper"
    order = 5000
    phases = frozenset({"response_body"})

    def on_response_body(self, exchange: Exchange) -> UpperFilter:
        exchange.response_headers.append((b"x-filter-asked", b"upper"))
        return UpperFilter()


class WrapConfig(PolicyConfig):
    limit: int = 1000
    hold: bool = False  # hold the head (Exchange.hold_head) instead of dropping Content-Length


class WrapFilter:
    """Needs the whole body (it writes its length first): holds up to ``limit`` bytes, then gives
    up and lets everything through unchanged."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: list[bytes] = []
        self.size = 0
        self.gave_up = False

    def feed(self, chunk: bytes) -> bytes:
        if self.gave_up:
            return chunk
        self.held.append(chunk)
        self.size += len(chunk)
        if self.size <= self.limit:
            return b""
        self.gave_up = True
        held, self.held = b"".join(self.held), []
        return held

    def end(self) -> bytes:
        if self.gave_up:
            return b""
        return b"<%d>" % self.size + b"".join(self.held) + b"</>"


@register
class ResponseWrap(Policy[WrapConfig]):
    name = "test_response_wrap"
    order = 4000
    phases = frozenset({"response_body"})

    def on_response_body(self, exchange: Exchange) -> WrapFilter:
        if self.config.hold:
            exchange.hold_head = True  # the engine frames what the filter ends up writing
        else:
            drop_length(exchange)
        return WrapFilter(self.config.limit)


class FailConfig(PolicyConfig):
    where: Literal["hook", "feed", "end"]
    after: int = 0  # bytes fed before ``feed`` fails
    hold: bool = False  # hold the head, and the body with it (Exchange.hold_head)


class FailingFilter:
    def __init__(self, where: str, after: int, hold: bool) -> None:
        self.where = where
        self.after = after
        self.hold = hold

    def feed(self, chunk: bytes) -> bytes:
        if self.where == "feed":
            self.after -= len(chunk)
            if self.after < 0:
                raise RuntimeError("the filter broke while feeding")
        return b"" if self.hold else chunk

    def end(self) -> bytes:
        if self.where == "end":
            raise RuntimeError("the filter broke at the end")
        return b""


@register
class ResponseFailing(Policy[FailConfig]):
    name = "test_response_failing"
    order = 3000
    phases = frozenset({"response_body"})

    def on_response_body(self, exchange: Exchange) -> FailingFilter:
        if self.config.where == "hook":
            raise RuntimeError("the hook broke")
        if self.config.hold:
            exchange.hold_head = True
        else:
            drop_length(exchange)
        return FailingFilter(self.config.where, self.config.after, self.config.hold)
