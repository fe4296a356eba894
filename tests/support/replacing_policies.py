"""Policies of a test's own, loaded through ``plugins:``, that exercise the engine's replaced
responses and detached copies: one whose response hook answers instead of chosen upstream
statuses or of the gateway's own errors, and one that sends a copy of a request upstream for no
client. What their hooks saw is kept in ``SEEN`` (the gateway runs in the test's process)."""

from __future__ import annotations

from typing import Any

from apigate.engine.exchange import Exchange
from apigate.engine.replies import Reply
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.registry import register

# (policy name, request id, what it saw): appended by the hooks, read by the tests.
SEEN: list[tuple[str, str, Any]] = []


class ReplaceConfig(PolicyConfig):
    statuses: list[int] = []  # upstream statuses answered instead
    errors: bool = False  # answer instead of the gateway's errors for an upstream it could not use
    always: bool = False  # return a Reply for every response, the replacement's included


@register
class ResponseReplace(Policy[ReplaceConfig]):
    name = "test_response_replace"
    order = 8000
    phases = frozenset({"response"})
    replaces_responses = True

    def on_response(self, exchange: Exchange) -> Reply | None:
        status = exchange.response_status
        SEEN.append((self.name, exchange.request_id, (status, exchange.failure)))
        config = self.config
        if config.always:
            return Reply(299, b"replaced again", [(b"x-replaced", b"again")], b"text/plain")
        if exchange.failure is not None:
            if not config.errors:
                return None
            why = exchange.failure.encode()
            return Reply(200, b"instead of " + why, [(b"x-replaced", why)], b"text/plain")
        if status in config.statuses and status != 200:
            return Reply(200, b"instead of %d" % status, [(b"x-replaced", b"%d" % status)], b"text/plain")
        return None


class NoConfig(PolicyConfig):
    pass


@register
class ResponseReturnsSomething(Policy[NoConfig]):
    """A response hook that returns a Reply on a class that does not say it replaces responses:
    the engine does not look at it."""

    name = "test_response_ignored"
    order = 7000
    phases = frozenset({"response"})

    def on_response(self, exchange: Exchange) -> Reply | None:
        return Reply(418, b"never sent")


@register
class DetachedCopy(Policy[NoConfig]):
    """A GET with ``X-Detach`` is answered 202 at once and sent upstream as a copy (with
    ``X-Detached: 1`` added) for no client; the copy's log hook notes what it got."""

    name = "test_detached_copy"
    order = 8000
    phases = frozenset({"request", "log"})

    def on_request(self, exchange: Exchange) -> Reply | None:
        if exchange.header(b"x-detach") is None:
            return None
        headers = [*exchange.headers, (b"x-detached", b"1")]
        copy = exchange.detached_copy(headers, {"detached": exchange.request_id})
        sent = b"none" if copy is None else copy.request_id.encode()
        return Reply(202, b"", [(b"x-copy", sent)])

    def on_log(self, exchange: Exchange) -> None:
        state = exchange.state or {}
        if "detached" in state:
            seen = (state["detached"], exchange.response_status, exchange.bytes_out, exchange.failure)
            SEEN.append((self.name, exchange.request_id, seen))
