"""The `oauth2-introspection` policy: accept a bearer token if the authorization server says it is
active (OAuth 2.0 Token Introspection, RFC 7662).

A token not in the cache is POSTed to ``introspection_url`` as ``token`` (and
``token_type_hint``), with the gateway's client credentials in HTTP Basic (RFC 6749 §2.3.1).
``"active": true`` admits the request, ``"active": false`` (or an ``exp`` in the past) is a 401
``invalid_token``. An authorization server that cannot be reached, answers with an error
status or with something that is not an introspection response is a 503: the token may well be
good, so the client is told to retry, not that its token is bad.

What an active token grants is what a verified JWT grants (see ``policies/claims.py``): its
claims, ``scopes`` and ``roles`` in ``exchange.vars()`` for `authorize`, and ``forward_claims``
as upstream headers. The first of ``consumer_claims`` (sub, client_id, username) whose value
names a consumer of the registry makes that consumer the caller (with its tenant and groups); a
disabled one is refused. Without such a consumer the caller is the first of those claims' values.

Answers are cached under the token: an active one until its ``exp`` (at most ``cache_ttl``), an
inactive one for ``negative_cache_ttl``; failures are not cached. Concurrent requests with the
same uncached token share one introspection call. A cache hit costs a header scan and a dict
probe, with no await.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import orjson
from pydantic import Field, SecretStr, field_validator

from apigate.config.headernames import check_header_name
from apigate.config.units import ByteSize, Duration
from apigate.config.validators import check_http_url
from apigate.engine.replies import Reply
from apigate.outbound import HttpClient, OutboundError, default_tls_context
from apigate.policies.authconfig import AuthConfig
from apigate.policies.base import Policy
from apigate.policies.claims import (
    BEARER_REASONS,
    NOT_FOR_TOKENS,
    BearerRefusals,
    ClaimForwarding,
    check_forward_claims,
    claim_text,
    claim_vars,
    remember_token,
)
from apigate.policies.registry import register

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

log = logging.getLogger("apigate.oauth2")

# RFC 6750 §2.1: the characters of a bearer token (b64token).
_BEARER_TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
MAX_RESPONSE_BYTES = 256 * 1024  # an introspection response larger than this is not one

_REASONS: dict[str, tuple[int, str]] = {
    **BEARER_REASONS,
    "token_inactive": (401, "the bearer token is not active"),
    "introspection_unavailable": (503, "the authorization server cannot be reached to check the token"),
    "introspection_failed": (503, "the authorization server did not answer the token check usably"),
}


class IntrospectionConfig(AuthConfig):
    introspection_url: str = Field(description="the authorization server's RFC 7662 endpoint")
    client_id: str = Field(min_length=1, description="the gateway's client id at the authorization server")
    client_secret: SecretStr = Field(description="the gateway's client secret")
    token_type_hint: str | None = "access_token"
    timeout: Duration = Field(default=5.0, gt=0, le=60, description="one introspection call, in total")
    cache_ttl: Duration = Field(
        default=300.0, ge=0, description="longest an active answer is reused (never past the token's exp)"
    )
    negative_cache_ttl: Duration = Field(
        default=10.0, ge=0, description="how long an inactive answer is reused"
    )
    cache_size: int = Field(default=10_000, ge=0)
    max_connections: int = Field(default=20, ge=1, le=1000, description="to the authorization server")
    header: str = "Authorization"
    max_token_bytes: ByteSize = Field(default=4096, ge=16)
    consumer_claims: list[str] = Field(
        default_factory=lambda: ["sub", "client_id", "username"],
        description="claims whose value may name a registered consumer; the first that does wins "
        "([] turns the lookup, and the store, off)",
    )
    tenant_claim: str | None = "tenant"
    forward_claims: dict[str, str] = Field(default_factory=dict, description="claim -> upstream header")
    strip_credential: bool = False

    @field_validator("introspection_url")
    @classmethod
    def _url(cls, url: str) -> str:
        check_http_url(url)
        if "@" in url.partition("://")[2].partition("/")[0]:
            raise ValueError("must not carry credentials; set client_id and client_secret")
        return url

    _forward = field_validator("forward_claims")(classmethod(lambda cls, v: check_forward_claims(v)))

    @field_validator("header")
    @classmethod
    def _header(cls, name: str) -> str:
        return check_header_name(name, "carry a token", NOT_FOR_TOKENS)

    @field_validator("token_type_hint")
    @classmethod
    def _hint(cls, hint: str | None) -> str | None:
        if hint is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", hint):
            raise ValueError("must be a plain name such as access_token or refresh_token")
        return hint


class _Answer:
    """A cached introspection answer: until when it holds and, for an active token, what it grants."""

    __slots__ = ("claims", "forward", "reason", "tenant", "until", "vars")

    def __init__(
        self,
        until: float,
        reason: str | None,
        claims: dict[str, Any] | None = None,
        vars: dict[str, Any] | None = None,
        forward: list[tuple[bytes, bytes]] | None = None,
        tenant: str | None = None,
    ) -> None:
        self.until = until
        self.reason = reason  # None: active; else why the token is refused
        self.claims = claims or {}
        self.vars = vars or {}
        self.forward = forward or []
        self.tenant = tenant


class _Unavailable(Exception):
    """The authorization server gave no usable answer; ``reason`` is one of the 503 reasons."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Introspector:
    """Cache, in-flight calls and connections of one config, shared by its policy instances (a
    global policy is built per route, and a reload with an unchanged config keeps the cache)."""

    def __init__(self, config: IntrospectionConfig) -> None:
        self.config = config
        self.clock: Callable[[], float] = time.time  # exp is wall-clock time; tests move this
        self.cache: dict[bytes, _Answer] = {}
        self.inflight: dict[bytes, asyncio.Future[_Answer]] = {}
        self.calls = 0
        if config.introspection_url.startswith("https://"):
            default_tls_context()  # built while the config is compiled, not on the loop
        self.client = HttpClient(max_connections_per_origin=config.max_connections)
        user = quote(config.client_id, safe="")
        password = quote(config.client_secret.get_secret_value(), safe="")
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.headers = [
            (b"Authorization", f"Basic {basic}".encode()),
            (b"Content-Type", b"application/x-www-form-urlencoded"),
            (b"Accept", b"application/json"),
        ]
        self.forwarding = ClaimForwarding(
            config.forward_claims, config.header.lower().encode(), config.strip_credential
        )

    def cached(self, token: bytes) -> _Answer | None:
        answer = self.cache.get(token)
        if answer is not None and answer.until > self.clock():
            return answer
        return None

    async def answer(self, token: bytes) -> _Answer:
        """The introspection answer for a token; concurrent callers share one call."""
        future = self.inflight.get(token)
        if future is None:
            future = asyncio.ensure_future(self._introspect(token))
            self.inflight[token] = future
            future.add_done_callback(lambda done: self._settled(token, done))
        # shield: a caller that goes away does not cancel the call the others wait for.
        return await asyncio.shield(future)

    def _settled(self, token: bytes, future: asyncio.Future[_Answer]) -> None:
        self.inflight.pop(token, None)
        if not future.cancelled():
            future.exception()  # retrieved here too: every waiter may have gone away

    async def _introspect(self, token: bytes) -> _Answer:
        config = self.config
        form = {"token": token.decode("ascii")}
        if config.token_type_hint is not None:
            form["token_type_hint"] = config.token_type_hint
        self.calls += 1
        try:
            response = await self.client.request(
                "POST",
                config.introspection_url,
                self.headers,
                urlencode(form).encode(),
                timeout=config.timeout,
                max_body=MAX_RESPONSE_BYTES,
                idempotent=True,  # introspection only reads (RFC 7662 §2.1): safe to resend
            )
        except OutboundError as exc:
            raise _Unavailable("introspection_unavailable", exc.message) from None
        if response.status != 200:
            reason = "introspection_unavailable" if response.status >= 500 else "introspection_failed"
            raise _Unavailable(reason, f"HTTP {response.status}")
        try:
            document = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            raise _Unavailable("introspection_failed", "the response is not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("active"), bool):
            raise _Unavailable("introspection_failed", 'the response has no boolean "active"')
        answer = self._judge(document)
        if config.cache_size and answer.until > self.clock():
            remember_token(self.cache, token, answer, config.cache_size)
        return answer

    def _judge(self, document: dict[str, Any]) -> _Answer:
        config = self.config
        now = self.clock()
        if not document["active"]:
            return _Answer(now + config.negative_cache_ttl, "token_inactive")
        until = now + config.cache_ttl
        exp = document.get("exp")
        if exp is not None:
            if not isinstance(exp, int | float) or isinstance(exp, bool):
                raise _Unavailable("introspection_failed", '"exp" is not a number')
            if exp <= now:  # an active answer for an expired token: the clocks disagree; trust exp
                return _Answer(now + config.negative_cache_ttl, "token_expired")
            until = min(until, float(exp))
        forward = self.forwarding.header_values(document)
        tenant = claim_text(document.get(config.tenant_claim)) if config.tenant_claim else None
        return _Answer(until, None, document, claim_vars(document), forward, tenant)


_introspectors: weakref.WeakValueDictionary[bytes, _Introspector] = weakref.WeakValueDictionary()


def _introspector_for(config: IntrospectionConfig) -> _Introspector:
    digest = hashlib.sha256(config.model_dump_json().encode())
    digest.update(b"\0secret\0" + config.client_secret.get_secret_value().encode())
    key = digest.digest()
    introspector = _introspectors.get(key)
    if introspector is None:
        introspector = _introspectors[key] = _Introspector(config)
    return introspector


@register
class IntrospectionPolicy(Policy[IntrospectionConfig]):
    name = "oauth2-introspection"
    order = 1000
    phases = frozenset({"request"})
    needs = frozenset({"consumers"})

    def prepare(self) -> None:
        config = self.config
        self.introspector = _introspector_for(config)
        if not config.consumer_claims:  # only a config that maps tokens onto consumers opens the store
            self.needs = frozenset()
        self._header = config.header.lower().encode()
        self._authorization = self._header == b"authorization"
        self._required = config.required
        self._max_token = config.max_token_bytes
        self._consumer_claims = list(config.consumer_claims)
        self._forwarding = self.introspector.forwarding
        refusals = BearerRefusals(config.realm, _REASONS)
        self.challenge = refusals.challenge
        self._reject = refusals.reply

    # -- the request hook ------------------------------------------------------------------------------
    def on_request(self, exchange: Exchange) -> Reply | Coroutine[Any, Any, Reply | None] | None:
        value = None
        for key, found in exchange.headers:
            if key == self._header:
                if value is not None:  # two credentials: the upstream might read the unchecked one
                    return self._reject(exchange, "invalid_token")
                value = found
        token = self._token(value)
        if token is None:
            if value is not None and not (self._authorization and _other_scheme(value)):
                return self._reject(exchange, "invalid_token")
            if self._required:
                return self._reject(exchange, "missing_token")
            self._forwarding.drop_client_claims(exchange)
            return None
        if len(token) > self._max_token:
            return self._reject(exchange, "token_too_large")
        if not _BEARER_TOKEN.fullmatch(token):
            return self._reject(exchange, "invalid_token")
        answer = self.introspector.cached(token)
        if answer is not None:
            return self._decide(exchange, answer)
        return self._after_introspection(exchange, token)

    def _token(self, value: bytes | None) -> bytes | None:
        """The bearer token in the header's value; None if there is none."""
        if value is None:
            return None
        stripped = value.strip(b" \t")
        if not self._authorization:
            return stripped or None  # a custom header carries the bare token
        scheme, _, rest = stripped.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        return rest.strip(b" \t") or None

    async def _after_introspection(self, exchange: Exchange, token: bytes) -> Reply | None:
        try:
            answer = await self.introspector.answer(token)
        except _Unavailable as exc:
            # The detail names the server's failure, never the token.
            log.warning("oauth2-introspection: %s: %s", self.config.introspection_url, exc)
            return self._reject(exchange, exc.reason)
        return self._decide(exchange, answer)

    def _decide(self, exchange: Exchange, answer: _Answer) -> Reply | None:
        if answer.reason is not None:
            return self._reject(exchange, answer.reason)
        caller = self._caller(answer)
        if caller is None:
            return self._reject(exchange, "invalid_token")  # the token's consumer is disabled
        exchange.consumer, exchange.tenant = caller
        self._forwarding.admit(exchange, answer.vars, answer.forward)
        return None

    def _caller(self, answer: _Answer) -> tuple[Any, str | None] | None:
        """(consumer, tenant): a registered consumer named by a claim, else the first claim's value;
        None when the named consumer is disabled."""
        registry = self.services.consumers
        fallback = None
        for claim in self._consumer_claims:
            value = answer.claims.get(claim)
            if not isinstance(value, str) or not value:
                continue
            consumer = registry.consumer(value) if registry is not None else None
            if consumer is not None:
                return None if consumer.disabled else (consumer, consumer.tenant)
            fallback = fallback or value
        return fallback, answer.tenant


def _other_scheme(value: bytes) -> bool:
    """An Authorization value of another scheme (Basic...): not this policy's credential."""
    scheme = value.strip(b" \t").partition(b" ")[0]
    return scheme.lower() != b"bearer" and bool(scheme)
