"""The `basic-auth` policy: identify the consumer by HTTP Basic credentials (RFC 7617).

The username is a consumer's id with the consumer's ``password_hash`` in the config (``apigate
hash-password`` makes one), or a login stored with ``apigate consumers set-password ID USERNAME``
(the config wins for a name that is both). scrypt takes ~50 ms, so a verification runs in the
default executor (the request hook returns an awaitable only then), and a success is cached for
``cache_ttl`` seconds under sha256 of the credentials: a repeated credential costs one hash and
one dict probe, inline. The cache is emptied when the registry reloads (config or store change).
Unknown users and wrong passwords get the same 401 ``invalid_credentials`` after the same work.
Forwarded headers behave as key-auth's: removed from the client's request, set on success.
"""

from __future__ import annotations

import binascii
import hashlib
from time import monotonic
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from apigate.consumers.keyindex import header_value
from apigate.consumers.passwords import PasswordChecksBusy, check_password_off_loop
from apigate.engine.replies import Reply, json_reply
from apigate.policies.authconfig import AuthConfig, check_forwarded_names
from apigate.policies.base import Policy
from apigate.policies.key_auth import ForwardHeaders
from apigate.policies.registry import register
from apigate.policies.services import CONSUMERS_NOT_READY, unavailable

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from apigate.consumers.registry import Login
    from apigate.engine.exchange import Exchange
    from apigate.store.roles.consumers import Consumer

AUTHORIZATION = b"authorization"
MAX_AUTHORIZATION = 4096  # bytes of header value; longer is malformed


class BasicAuthConfig(AuthConfig):
    hide_credentials: bool = Field(default=True, description="remove Authorization before proxying")
    forward_headers: ForwardHeaders = ForwardHeaders()
    cache_ttl: float = Field(
        default=60.0, ge=0, description="seconds a verified credential is cached (0: off)"
    )
    cache_size: int = Field(default=10_000, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _checks(self) -> BasicAuthConfig:
        if self.forward_headers.key_id is not None:
            raise ValueError("basic-auth has no key id to forward (forward_headers.key_id must be null)")
        check_forwarded_names(self.forward_headers, "Authorization")
        return self


class MalformedBasic(Exception):
    """Basic credentials that cannot be read (bad base64, no colon, not UTF-8, too long)."""


def parse_basic(value: bytes) -> tuple[str, bytes] | None:
    """(username, password) from an Authorization value; None if the scheme is not Basic.

    Raises MalformedBasic for Basic credentials that cannot be read."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    if len(value) > MAX_AUTHORIZATION:
        raise MalformedBasic
    try:
        decoded = binascii.a2b_base64(token.strip(), strict_mode=True)
        text = decoded.decode("utf-8")
    except (binascii.Error, ValueError):
        raise MalformedBasic from None
    username, colon, password = text.partition(":")
    if not colon:
        raise MalformedBasic
    return username, password.encode()


@register
class BasicAuthPolicy(Policy[BasicAuthConfig]):
    name = "basic-auth"
    order = 1000
    phases = frozenset({"request"})
    needs = frozenset({"consumers"})

    def prepare(self) -> None:
        config = self.config
        forward = config.forward_headers
        self.h_consumer, self.h_tenant, self.h_groups = (
            name.lower().encode() if name is not None else None
            for name in (forward.consumer_id, forward.tenant, forward.groups)
        )
        self.forwarded = frozenset(h for h in (self.h_consumer, self.h_tenant, self.h_groups) if h)
        self.watched = self.forwarded | {AUTHORIZATION}
        self.hide = config.hide_credentials
        self.auth_required = config.required
        self.ttl = config.cache_ttl
        self.cache_size = config.cache_size
        challenge = f'Basic realm="{config.realm}", charset="UTF-8"'.encode()
        self.challenge = challenge
        self._challenge = [(b"www-authenticate", challenge)]
        # Derived from the registry; rebuilt (and the cache emptied) when it reloads.
        self._source: tuple[Any, Any] | None = None
        self._forwards: dict[str, list[tuple[bytes, bytes]]] = {}
        self._cache: dict[bytes, tuple[float, str]] = {}

    # -- answers --------------------------------------------------------------------------------
    def _deny(self, exchange: Exchange, reason: str, message: str) -> Reply:
        payload = {"error": message, "reason": reason, "request_id": exchange.request_id}
        return json_reply(401, payload, self._challenge)

    def _invalid(self, exchange: Exchange) -> Reply:
        return self._deny(exchange, "invalid_credentials", "the username or password is not valid")

    # -- the registry's view ------------------------------------------------------------------------
    def _sync(self, registry: Any) -> None:
        source = (registry.config, registry.version)
        current = self._source
        if current is not None and current[0] is source[0] and current[1] == source[1]:
            return
        self._forwards = {}
        self._cache = {}
        self._source = source

    # -- the request hook --------------------------------------------------------------------------
    def on_request(self, exchange: Exchange) -> Reply | Awaitable[Reply | None] | None:
        registry = self.services.consumers
        headers = exchange.headers
        found: tuple[bytes, bytes] | None = None
        rebuild = False  # client-sent forwarded headers, or Authorization twice
        for pair in headers:
            if pair[0] in self.watched:
                if pair[0] == AUTHORIZATION and found is None:
                    found = pair
                else:
                    rebuild = True
        try:
            credentials = parse_basic(found[1]) if found is not None else None
        except MalformedBasic:
            return self._deny(exchange, "malformed_authorization", "the Authorization header cannot be read")
        if credentials is None:
            if self.auth_required:
                if registry is None:
                    return unavailable(exchange, CONSUMERS_NOT_READY)
                return self._deny(exchange, "missing_credentials", "a username and password are required")
            if rebuild:
                exchange.headers = [pair for pair in headers if pair[0] not in self.forwarded]
            return None
        if registry is None:
            return unavailable(exchange, CONSUMERS_NOT_READY)
        self._sync(registry)
        username, password = credentials
        digest = hashlib.sha256(username.encode() + b"\x00" + password).digest()
        entry = self._cache.get(digest)
        if entry is not None:
            if entry[0] > monotonic():
                return self._accept(exchange, registry, entry[1], found, rebuild)
            del self._cache[digest]
        return self._verify(exchange, registry, password, registry.login(username), digest, found, rebuild)

    async def _verify(
        self,
        exchange: Exchange,
        registry: Any,
        password: bytes,
        stored: Login | None,
        digest: bytes,
        found: tuple[bytes, bytes] | None,
        rebuild: bool,
    ) -> Reply | None:
        source = self._source
        try:
            ok = await check_password_off_loop(stored.hash if stored is not None else None, password)
        except PasswordChecksBusy:
            return unavailable(exchange, "too many password checks in flight, try again")
        if not ok or stored is None:
            return self._invalid(exchange)
        consumer_id = stored.consumer_id
        if self.ttl > 0 and self._source is source:
            cache = self._cache
            while len(cache) >= self.cache_size:
                del cache[next(iter(cache))]  # the oldest
            cache[digest] = (monotonic() + self.ttl, consumer_id)
        return self._accept(exchange, registry, consumer_id, found, rebuild)

    def _accept(
        self,
        exchange: Exchange,
        registry: Any,
        consumer_id: str,
        found: tuple[bytes, bytes] | None,
        rebuild: bool,
    ) -> Reply | None:
        consumer: Consumer | None = registry.consumer(consumer_id)
        if consumer is None or consumer.disabled:
            return self._invalid(exchange)
        headers = exchange.headers
        if rebuild:
            drop = self.watched if self.hide else self.forwarded
            headers = [pair for pair in headers if pair[0] not in drop]
            exchange.headers = headers
        elif self.hide and found is not None:
            headers.remove(found)  # by identity
        forwards = self._forwards.get(consumer_id)
        if forwards is None:
            forwards = self._forwards[consumer_id] = self._forward_pairs(consumer)
        if forwards:
            headers += forwards
        exchange.consumer = consumer
        exchange.tenant = consumer.tenant
        return None

    def _forward_pairs(self, consumer: Consumer) -> list[tuple[bytes, bytes]]:
        pairs = [
            (self.h_consumer, header_value(consumer.id)),
            (self.h_tenant, header_value(consumer.tenant)),
            (self.h_groups, header_value(",".join(consumer.groups))),
        ]
        return [(name, value) for name, value in pairs if name is not None and value is not None]
