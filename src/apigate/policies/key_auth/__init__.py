"""The `key-auth` policy: identify the consumer by an API key in a header (or a query parameter).

Success costs one scan of the request headers, one HMAC and one dict probe; the clock is read
only for keys with an expiry, a pending revocation or time windows. Unknown, revoked and expired
keys and keys of disabled consumers all get the same 401 ``invalid_key``, so the answer says
nothing about which keys exist. The headers named in ``forward_headers`` are always removed from
the client's request and, on success, set from the consumer: an upstream can trust them.
"""

from __future__ import annotations

import re
from time import time as _time
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from pydantic import Field, field_validator, model_validator

from apigate.config.headernames import check_header_name
from apigate.engine.replies import Reply, json_reply
from apigate.policies.authconfig import AuthConfig, check_forwarded_names
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.key_auth.hotpath import KeyCheck, admit
from apigate.policies.registry import register
from apigate.policies.services import CONSUMERS_NOT_READY, unavailable

if TYPE_CHECKING:
    from apigate.consumers.keyindex import KeyMatch
    from apigate.engine.exchange import Exchange

_PARAM_NAME = re.compile(r"^[A-Za-z0-9._~-]+$")


def _check_header(name: str | None) -> str | None:
    if name is None:
        return None
    return check_header_name(name, "be used here")


class ForwardHeaders(PolicyConfig):
    """Headers set from the consumer for the upstream (null disables one)."""

    consumer_id: str | None = "X-Consumer-ID"
    tenant: str | None = "X-Tenant-ID"
    key_id: str | None = None
    groups: str | None = Field(default=None, description="the consumer's groups, comma-separated")

    _names = field_validator("consumer_id", "tenant", "key_id", "groups")(
        classmethod(lambda cls, v: _check_header(v))
    )


class KeyAuthConfig(AuthConfig):
    header: str = Field(default="X-API-Key", description="request header that carries the key")
    query_param: str | None = Field(default=None, description="also accept ?<name>=<key> (off by default)")
    required_scopes: list[str] = Field(default_factory=list, description="the key must have all of them")
    hide_credentials: bool = Field(default=True, description="remove the key before proxying")
    forward_headers: ForwardHeaders = ForwardHeaders()

    _header = field_validator("header")(classmethod(lambda cls, v: _check_header(v)))

    @field_validator("query_param")
    @classmethod
    def _check_param(cls, name: str | None) -> str | None:
        if name is not None and not _PARAM_NAME.match(name):
            raise ValueError(f"{name!r} is not a plain query parameter name (letters, digits, . _ ~ -)")
        return name

    @field_validator("required_scopes")
    @classmethod
    def _check_scopes(cls, scopes: list[str]) -> list[str]:
        for scope in scopes:
            if not scope or any(c.isspace() for c in scope):
                raise ValueError(f"scope {scope!r} must be non-empty and without spaces")
        return scopes

    @model_validator(mode="after")
    def _distinct(self) -> KeyAuthConfig:
        check_forwarded_names(self.forward_headers, self.header)
        return self


@register
class KeyAuthPolicy(Policy[KeyAuthConfig]):
    name = "key-auth"
    order = 1000
    phases = frozenset({"request"})
    needs = frozenset({"consumers"})

    def prepare(self) -> None:
        config = self.config
        self.key_header = config.header.lower().encode()
        forward = config.forward_headers
        lower = {
            field: (name.lower().encode() if name is not None else None)
            for field, name in forward.model_dump().items()
        }
        self.h_consumer = lower["consumer_id"]
        self.h_tenant = lower["tenant"]
        self.h_key_id = lower["key_id"]
        self.h_groups = lower["groups"]
        self.forwarded = frozenset(v for v in lower.values() if v is not None)
        # Names this configuration forwards, as one bytes key (its hash is computed once).
        self.forward_token = b"|".join(v or b"" for v in lower.values())
        # Headers the scan reacts to: the key's, and the forwarded ones (a client may not send them).
        self.watched = self.forwarded | {self.key_header}
        self.hide = config.hide_credentials
        self.key_required = config.required
        self.query_prefix = config.query_param.encode() + b"=" if config.query_param else None
        self.required = frozenset(config.required_scopes)
        self.required_list = sorted(self.required)
        challenge = f'ApiKey realm="{config.realm}", header="{config.header}"'
        if config.query_param:
            challenge += f', query="{config.query_param}"'
        self.challenge = challenge.encode()
        self.challenge_invalid = (challenge + ', error="invalid_key"').encode()
        # The usual request goes to the compiled check, which hands the others to the full one; a
        # key that may be in the query always takes the full check.
        if self.query_prefix is None:
            fast = KeyCheck(
                self.services,
                self.key_header,
                self.watched,
                self.hide,
                self.required,
                self.forward_token,
                self.check,
            )
            self.engine_hooks = {"request": fast}  # called natively by the engine
        else:
            self.engine_hooks = {"request": self.check}

    # -- answers --------------------------------------------------------------------------------
    def _deny(
        self, exchange: Exchange, status: int, reason: str, message: str, challenge: bytes | None = None
    ) -> Reply:
        payload: dict[str, object] = {"error": message, "reason": reason, "request_id": exchange.request_id}
        if reason == "insufficient_scope":
            payload["required_scopes"] = self.required_list
        headers = [(b"www-authenticate", challenge)] if challenge is not None else None
        return json_reply(status, payload, headers)

    def _missing(self, exchange: Exchange) -> Reply:
        return self._deny(exchange, 401, "missing_key", "an API key is required", self.challenge)

    def _unavailable(self, exchange: Exchange) -> Reply:
        return unavailable(exchange, CONSUMERS_NOT_READY)

    def _invalid(self, exchange: Exchange) -> Reply:
        return self._deny(exchange, 401, "invalid_key", "the API key is not valid", self.challenge_invalid)

    # -- the request hook --------------------------------------------------------------------------
    def check(self, exchange: Exchange) -> Reply | None:
        """The full check: any request, any answer (``KeyCheck`` admits the usual one faster)."""
        registry = self.services.consumers
        if registry is None and self.key_required:
            return self._unavailable(exchange)
        headers = exchange.headers
        key_header = self.key_header
        watched = self.watched
        found: tuple[bytes, bytes] | None = None
        rebuild = False  # a forwarded header sent by the client, or the key header twice
        for pair in headers:
            name = pair[0]
            if name in watched:
                if name == key_header and found is None:
                    found = pair
                else:
                    rebuild = True
        presented = found[1] if found is not None else None
        if not presented and self.query_prefix is not None:
            presented = self._from_query(exchange) or presented
        elif self.query_prefix is not None and self.hide:
            self._from_query(exchange)  # the key came in the header: still strip a query copy
        if not presented:
            if self.key_required:
                return self._missing(exchange)
            if rebuild:  # no key, but client-sent forwarded headers: the upstream trusts those
                exchange.headers = [pair for pair in headers if pair[0] not in self.forwarded]
            return None

        if registry is None:  # not required, and a key to check
            return self._unavailable(exchange)
        match = registry.lookup(presented)
        if match is None:
            return self._invalid(exchange)
        deadline = match.deadline
        if deadline is not None and _time() >= deadline:
            return self._invalid(exchange)
        if match.networks is not None and not match.allows_ip(exchange.client_ip):
            return self._deny(
                exchange, 403, "key_not_allowed_here", "this API key cannot be used from this address"
            )
        if match.schedule is not None and not match.schedule.allows(_time()):
            return self._deny(
                exchange, 403, "key_outside_time_window", "this API key cannot be used at this time"
            )
        if self.required and not self.required <= match.scopes:
            return self._deny(exchange, 403, "insufficient_scope", "the API key lacks a required scope")

        # Accepted: drop the key (if hidden) and any client-sent forwarded headers, then set ours.
        if rebuild:
            drop = watched if self.hide else self.forwarded
            headers = [pair for pair in headers if pair[0] not in drop]
            exchange.headers = headers
        elif self.hide and found is not None:
            headers.remove(found)  # found by identity: no comparison of values
        forwards = match.forwards.get(self.forward_token)
        if forwards is None:
            forwards = match.forwards[self.forward_token] = self._forwards(match)
        admit(exchange, headers, match, forwards)
        return None

    def on_request(self, exchange: Exchange) -> Reply | None:
        return self.engine_hooks["request"](exchange)  # what the engine calls directly

    def _forwards(self, match: KeyMatch) -> list[tuple[bytes, bytes]]:
        pairs = [
            (self.h_consumer, match.consumer_id_value),
            (self.h_tenant, match.tenant_value),
            (self.h_key_id, match.key_id_value),
            (self.h_groups, match.groups_value),
        ]
        return [(name, value) for name, value in pairs if name is not None and value is not None]

    def _from_query(self, exchange: Exchange) -> bytes | None:
        """The key from the query string (first occurrence), removing it there if credentials are hidden."""
        query = exchange.query
        prefix = self.query_prefix
        assert prefix is not None
        if not query or prefix not in query:
            return None
        found: bytes | None = None
        kept: list[bytes] = []
        for part in query.split(b"&"):
            if part.startswith(prefix):
                if found is None:
                    found = unquote_to_bytes(part[len(prefix) :].replace(b"+", b" "))
            else:
                kept.append(part)
        if self.hide:
            exchange.query = b"&".join(kept)
        return found
