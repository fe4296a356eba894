"""The `jwt` policy: verify a bearer JWT (HS/RS/PS/ES/EdDSA) before the request goes upstream.

Keys come from an HS ``secret``, a PEM ``public_key``/``public_key_file``, a ``jwks_url`` or
OIDC ``issuer_discovery`` (see ``keys.py``). A valid token sets ``exchange.consumer`` and
``exchange.tenant`` from claims, puts ``claims``, ``scopes`` and ``roles`` in
``exchange.vars()`` for later policies, and can forward claims to the upstream as headers
(a client-sent header of the same name is always replaced). Anything else is a 401 with a
``WWW-Authenticate: Bearer`` challenge and a reason code; the token itself is never echoed.

Speed: a repeated token costs a header scan, one dict lookup and one clock read. Verified
tokens are cached (credential bytes -> expiry, consumer, tenant, vars, forward headers);
a hit does no parsing, no signature check and no await. How that meets the engine:

- ``check()`` is a plain method: a cache hit, and also a miss whose key is already at hand
  (pure CPU: parse and verify), return ``None`` or a ``Reply``; only a miss that needs keys
  from the network (first use of a JWKS, an unknown ``kid``) returns a coroutine.
- ``on_request`` is ``check``: the engine runs request hooks inline and moves to a task only
  when a hook hands back an awaitable, so a hit costs no task and no loop iteration.
- The hit itself runs in ``hotpath.py``, which mypyc compiles (setup.py); a miss comes back here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import time
import weakref
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote_to_bytes

import jwt as pyjwt
import orjson
from pydantic import Field, SecretStr, field_validator, model_validator

from apigate.config.headernames import HEADER_NAME, check_header_name
from apigate.config.units import ByteSize, Duration
from apigate.config.validators import check_http_url
from apigate.engine.replies import Reply
from apigate.httpspec import cookie_value
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
from apigate.policies.jwt.hotpath import CachedTokens, Entry, cache_key_of, cached
from apigate.policies.jwt.keys import (
    ALGORITHMS,
    HMAC_MIN_BYTES,
    KeySet,
    PublicKey,
    describe_kind,
    load_public_key,
    shared_keyset,
    static_key,
)
from apigate.policies.registry import register

if TYPE_CHECKING:
    from apigate.engine.exchange import Exchange

_now = time.time  # tokens carry wall-clock times; time.time() is a single cheap C call

# A compact JWS: three base64url segments. Anything else (JWE, alg "none" with an empty
# signature, spaces, non-ASCII) is refused before any decoding.
_COMPACT_JWS = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_KEY_SOURCES = "secret, public_key, public_key_file, jwks_url or issuer_discovery"
# Where ``auth: jwt`` (routes.yaml files written for the Pactown gateway) finds its HS256 secret:
# the first variable set and not empty. The Pactown gateway reads JWT_SECRET; services that issue
# the tokens often name it JWT_SECRET_KEY.
SHORTHAND_SECRET_VARIABLES: Final = ("JWT_SECRET", "JWT_SECRET_KEY")

# reason -> (status, message). Messages say what is wrong with the token, never which part of
# a signature check failed or anything about the keys.
_NUMERIC_DATES: Final = ("exp", "nbf", "iat")
_REASONS: dict[str, tuple[int, str]] = {
    **BEARER_REASONS,
    "token_not_yet_valid": (401, "the bearer token is not valid yet"),
    "invalid_issuer": (401, "the bearer token's issuer is not accepted here"),
    "invalid_audience": (401, "the bearer token is not meant for this audience"),
    "missing_claim": (401, "the bearer token lacks a required claim"),
    **{
        f"invalid_{claim}": (401, f"the bearer token's {claim} claim must be a JSON number (a NumericDate)")
        for claim in _NUMERIC_DATES
    },
    "unknown_key": (401, "the bearer token was signed with an unknown key"),
    "token_revoked": (401, "the bearer token has been revoked"),
    "revocations_unavailable": (503, "the list of revoked tokens cannot be read right now"),
    "keys_unavailable": (503, "the keys to verify bearer tokens cannot be loaded right now"),
}


class JwtConfig(AuthConfig):
    algorithms: list[str] = Field(default_factory=lambda: ["RS256"], min_length=1)
    # Key sources: at least one.
    secret: SecretStr | None = Field(default=None, description="shared secret for HS256/384/512")
    public_key: str | None = Field(default=None, description="PEM public key or certificate")
    public_key_file: str | None = Field(default=None, description="path to a PEM public key or certificate")
    jwks_url: str | None = None
    issuer_discovery: str | None = Field(
        default=None, description="issuer URL; keys from its /.well-known/openid-configuration jwks_uri"
    )
    # Claims.
    issuer: str | None = Field(default=None, description="required iss (default: issuer_discovery)")
    audience: str | list[str] | None = Field(default=None, description="aud must contain one of these")
    leeway: Duration = Field(default=30.0, le=3600)
    required_claims: list[str] = Field(default_factory=lambda: ["exp"])
    denied_jti: list[str] = Field(default_factory=list)
    check_revoked: bool = Field(
        default=False,
        description="also refuse tokens whose jti was revoked at runtime (`apigate tokens revoke`); "
        "uses the store",
    )
    # Where the token is.
    header: str = "Authorization"
    cookie: str | None = None
    query_param: str | None = None
    # What a valid token does.
    forward_claims: dict[str, str] = Field(default_factory=dict, description="claim -> upstream header")
    strip_credential: bool = False
    consumer_claim: str | None = "sub"
    tenant_claim: str | None = "tenant"
    # Limits and timings.
    max_token_bytes: ByteSize = Field(default=8192, ge=64)
    cache_size: int = Field(default=10000, ge=0)
    jwks_refresh_interval: Duration = Field(default=600.0, ge=1)
    jwks_min_refetch_interval: Duration = Field(default=30.0, ge=0.1)
    jwks_timeout: Duration = Field(default=5.0, gt=0, le=60)

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, algorithms: list[str]) -> list[str]:
        for alg in algorithms:
            if alg.lower() == "none":
                raise ValueError("'none' is never accepted: tokens must be signed")
            if alg not in ALGORITHMS:
                raise ValueError(f"unsupported algorithm {alg!r} (supported: {', '.join(ALGORITHMS)})")
        return list(dict.fromkeys(algorithms))

    @field_validator("public_key")
    @classmethod
    def _public_key(cls, pem: str | None) -> str | None:
        if pem is not None:
            load_public_key(pem)
        return pem

    @field_validator("public_key_file")
    @classmethod
    def _public_key_file(cls, path: str | None) -> str | None:
        if path is not None:
            _read_key_file(path)
        return path

    @field_validator("jwks_url", "issuer_discovery")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        return check_http_url(url) if url is not None else None

    @field_validator("header")
    @classmethod
    def _header(cls, name: str) -> str:
        return check_header_name(name, "carry a token", NOT_FOR_TOKENS)

    @field_validator("cookie", "query_param")
    @classmethod
    def _param_name(cls, name: str | None) -> str | None:
        if name is not None and not HEADER_NAME.match(name):
            raise ValueError("must be a non-empty name without spaces, '=', ';' or '&'")
        return name

    @field_validator("forward_claims")
    @classmethod
    def _forward(cls, pairs: dict[str, str]) -> dict[str, str]:
        return check_forward_claims(pairs)

    @model_validator(mode="after")
    def _keys_fit_algorithms(self) -> JwtConfig:
        if not any(
            (self.secret, self.public_key, self.public_key_file, self.jwks_url, self.issuer_discovery)
        ):
            raise ValueError(f"no key source: set one of {_KEY_SOURCES}")
        if self.public_key is not None and self.public_key_file is not None:
            raise ValueError("set public_key or public_key_file, not both")
        hmac = [alg for alg in self.algorithms if ALGORITHMS[alg][0] == "oct"]
        asymmetric = [alg for alg in self.algorithms if ALGORITHMS[alg][0] != "oct"]
        if hmac and self.secret is None:
            raise ValueError(f"algorithms lists {hmac[0]}, which needs a secret")
        if self.secret is not None:
            if not hmac:
                raise ValueError("secret is set but algorithms lists no HS algorithm (HS256, HS384, HS512)")
            size = len(self.secret.get_secret_value().encode())
            for alg in hmac:
                if size < HMAC_MIN_BYTES[alg]:
                    raise ValueError(f"secret must be at least {HMAC_MIN_BYTES[alg]} bytes for {alg}")
        has_public = any((self.public_key, self.public_key_file, self.jwks_url, self.issuer_discovery))
        if asymmetric and not has_public:
            raise ValueError(
                f"algorithms lists {asymmetric[0]}, which needs public_key, public_key_file, "
                "jwks_url or issuer_discovery"
            )
        if has_public and not asymmetric:
            raise ValueError("a public key source is set but algorithms lists only HS algorithms")
        pem = self.public_key if self.public_key is not None else None
        if pem is None and self.public_key_file is not None:
            pem = _read_key_file(self.public_key_file)
        if pem is not None:
            key = static_key(load_public_key(pem))
            if not any(key.can_verify(alg) for alg in asymmetric):
                raise ValueError(
                    f"the public key is {describe_kind(key.kind)}, which none of algorithms can use"
                )
        return self


def _read_key_file(path: str) -> str:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the file: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise ValueError("is not a PEM text file") from None
    load_public_key(text)
    return text


# -- the verified-token cache ------------------------------------------------------------------------
class _Shared:
    """Cache and keys of one config, shared by its policy instances (a global policy is built per
    route, and a reload with an unchanged config keeps the cache warm)."""

    def __init__(self, config: JwtConfig) -> None:
        self.cache: dict[bytes, Entry] = {}
        self.secret = config.secret.get_secret_value().encode() if config.secret is not None else None
        pem = config.public_key
        if pem is None and config.public_key_file is not None:
            pem = Path(config.public_key_file).read_text()
        self.static: list[PublicKey] = [static_key(load_public_key(pem))] if pem is not None else []
        self.keyset: KeySet | None = None
        if config.jwks_url is not None or config.issuer_discovery is not None:
            self.keyset = shared_keyset(
                config.jwks_url,
                config.issuer_discovery if config.jwks_url is None else None,
                config.jwks_refresh_interval,
                config.jwks_min_refetch_interval,
                config.jwks_timeout,
            )
            self.keyset.listeners.add(self)
            self.keyset.start()

    def keys_removed(self) -> None:
        self.cache.clear()


_shared: weakref.WeakValueDictionary[bytes, _Shared] = weakref.WeakValueDictionary()


def _shared_for(config: JwtConfig) -> _Shared:
    digest = hashlib.sha256(config.model_dump_json().encode())
    if config.secret is not None:
        digest.update(b"\0secret\0" + config.secret.get_secret_value().encode())
    if config.public_key_file is not None:
        digest.update(b"\0file\0" + Path(config.public_key_file).read_bytes())
    key = digest.digest()
    shared = _shared.get(key)
    if shared is None:
        shared = _Shared(config)
        _shared[key] = shared
    return shared


# -- claims -> what the request gets --------------------------------------------------------------------
def _b64url(segment: bytes) -> bytes:
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


@register
class JwtPolicy(Policy[JwtConfig]):
    name = "jwt"
    order = 1000
    phases = frozenset({"request"})
    needs = frozenset({"consumers"})
    shorthand = "auth"  # auth: jwt

    @classmethod
    def expand_shorthand(cls, value: str) -> dict[str, Any] | None:
        """``auth: jwt``: HS256 bearer tokens signed with the secret of the first of
        ``SHORTHAND_SECRET_VARIABLES`` that is set. A ValueError (the route is then closed) when
        none is, or when the secret is shorter than RFC 7518 §3.2 allows: a short HMAC key can
        be guessed offline from any one token, and then tokens can be forged."""
        if value != "jwt":
            return None
        for variable in SHORTHAND_SECRET_VARIABLES:
            secret = os.environ.get(variable, "")
            if secret:
                break
        else:
            wanted = " or ".join(SHORTHAND_SECRET_VARIABLES)
            raise ValueError(f"set {wanted} to the secret its HS256 tokens are signed with")
        size, least = len(secret.encode()), HMAC_MIN_BYTES["HS256"]
        if size < least:
            raise ValueError(
                f"{variable} holds {size} bytes and an HS256 secret needs at least {least} "
                "(RFC 7518 §3.2): set it to a longer random secret"
            )
        return {"algorithms": ["HS256"], "secret": secret}

    def prepare(self) -> None:
        config = self.config
        self._state = _shared_for(config)
        self._cache = self._state.cache
        self._cache_size = config.cache_size
        self._header = config.header.lower().encode()
        self._authorization = self._header == b"authorization"
        self._cookie = config.cookie.encode() if config.cookie else None
        self._query = config.query_param.encode() if config.query_param else None
        self._max_token = config.max_token_bytes
        self._algorithms = frozenset(config.algorithms)
        self._denied = frozenset(config.denied_jti)
        self._check_revoked = config.check_revoked
        # Only a config that checks the runtime denylist (kept by the consumer registry) makes
        # the gateway open the store.
        if not config.check_revoked:
            self.needs = frozenset()
        self._forwarding = ClaimForwarding(config.forward_claims, self._header, config.strip_credential)
        self._required = config.required
        issuer = config.issuer if config.issuer is not None else config.issuer_discovery
        audience = config.audience
        self._decode_args: dict[str, Any] = {
            "options": {"require": list(config.required_claims), "verify_aud": audience is not None},
            "audience": audience,
            "issuer": issuer,
            "leeway": config.leeway,
        }
        self._leeway = config.leeway
        refusals = BearerRefusals(config.realm, _REASONS)
        self.challenge = refusals.challenge
        self._reject = refusals.reply
        self._cached = CachedTokens(
            self._header, self._cache, self._forwarding.drop, self._miss, self._admit_cached, self._reject
        )
        # The engine calls the (compiled) cached-token check directly: no Python frame per request.
        self.engine_hooks = {"request": self._cached.check}

    # -- the request hook ----------------------------------------------------------------------------
    def check(self, exchange: Exchange) -> Reply | Coroutine[Any, Any, Reply | None] | None:
        """None (go on) or a Reply; a coroutine only when keys must be fetched first."""
        return self._cached.check(exchange)  # what the engine calls without this frame

    on_request = check

    # -- a token not in the cache ----------------------------------------------------------------------

    def _miss(self, exchange: Exchange, value: bytes | None) -> Reply | Coroutine[Any, Any, Any] | None:
        token: bytes | None = None
        source = "header"
        cache_key = value
        if value is not None:
            stripped = value.strip(b" \t")
            scheme, _, rest = stripped.partition(b" ")
            if scheme.lower() == b"bearer":
                token = rest.strip(b" \t")
                if not token:
                    return self._reject(exchange, "invalid_token")
            elif not stripped:
                return self._reject(exchange, "invalid_token")
            elif not self._authorization:
                token = stripped  # a custom header may carry the bare token
            else:
                cache_key = None  # another scheme (Basic...): no bearer token in the header
        if token is None and self._cookie is not None:
            token, source = self._from_cookie(exchange), "cookie"
        if token is None and self._query is not None:
            token, source = self._from_query(exchange), "query"
        if source != "header" and token is not None:
            # Remembered as the header form: one entry per token, and a bare token in an
            # Authorization header (not a credential there) never matches it.
            cache_key = b"Bearer " + token
        if token is None or cache_key is None:
            if self._required:
                return self._reject(exchange, "missing_token")
            self._forwarding.drop_client_claims(exchange)
            return None
        if source != "header":
            entry = cached(self._cache, cache_key)
            if entry is not None and entry.expires > _now():
                return self._admit_cached(exchange, entry, source)
        if len(token) > self._max_token:
            return self._reject(exchange, "token_too_large")
        if not _COMPACT_JWS.fullmatch(token):
            return self._reject(exchange, "invalid_token")
        try:
            header = orjson.loads(_b64url(token[: token.index(b".")]))
        except (binascii.Error, ValueError):
            return self._reject(exchange, "invalid_token")
        if not isinstance(header, dict):
            return self._reject(exchange, "invalid_token")
        alg, kid = header.get("alg"), header.get("kid")
        # The alg must be one this route accepts: this is what stops "none" and algorithm
        # confusion (an HS256 token "signed" with an RSA public key on an RS256 route).
        if (
            alg.__class__ is not str
            or alg not in self._algorithms
            or (kid is not None and kid.__class__ is not str)
        ):
            return self._reject(exchange, "invalid_token")
        if ALGORITHMS[alg][0] == "oct":
            keys: list[Any] = [self._state.secret]
        else:
            keys = self._public_keys(kid, alg)
            if not keys:
                keyset = self._state.keyset
                if keyset is None:
                    return self._reject(exchange, "unknown_key")
                if keyset.knows(kid):
                    return self._reject(exchange, "invalid_token")  # that key is for another alg
                if keyset.may_refetch(kid):
                    return self._after_fetch(exchange, token, alg, kid, cache_key, source)
                return self._reject(exchange, "unknown_key" if keyset.loaded else "keys_unavailable")
        return self._verify(exchange, token, alg, keys, cache_key, source)

    def _public_keys(self, kid: str | None, alg: str) -> list[Any]:
        keyset = self._state.keyset
        found = keyset.candidates(kid, alg) if keyset is not None else []
        found += [key for key in self._state.static if key.can_verify(alg)]
        return [key.key for key in found]

    async def _after_fetch(
        self, exchange: Exchange, token: bytes, alg: str, kid: str | None, cache_key: bytes, source: str
    ) -> Reply | None:
        keyset = self._state.keyset
        assert keyset is not None
        await keyset.refetch()
        keys = self._public_keys(kid, alg)
        if not keys:
            if keyset.knows(kid):
                return self._reject(exchange, "invalid_token")
            return self._reject(exchange, "unknown_key" if keyset.loaded else "keys_unavailable")
        return self._verify(exchange, token, alg, keys, cache_key, source)

    def _verify(
        self, exchange: Exchange, token: bytes, alg: str, keys: list[Any], cache_key: bytes, source: str
    ) -> Reply | None:
        claims: dict[str, Any] | None = None
        reason = "invalid_token"
        for key in keys:
            try:
                claims = pyjwt.decode(token, key, algorithms=[alg], **self._decode_args)
                break
            except (pyjwt.InvalidSignatureError, pyjwt.InvalidKeyError):
                continue  # another candidate key may fit (tokens without kid)
            except pyjwt.ExpiredSignatureError:
                reason = "token_expired"
            except pyjwt.ImmatureSignatureError:
                reason = "token_not_yet_valid"
            except pyjwt.InvalidAudienceError:
                reason = "invalid_audience"
            except pyjwt.InvalidIssuerError:
                reason = "invalid_issuer"
            except pyjwt.MissingRequiredClaimError as exc:
                reason = {"aud": "invalid_audience", "iss": "invalid_issuer"}.get(exc.claim, "missing_claim")
            except Exception:  # any other decoding problem, whatever raised it
                reason = "invalid_token"
            break
        if claims is None:
            return self._reject(exchange, reason)
        # RFC 7519 §2: a NumericDate is a JSON number. PyJWT also takes "1700000000" and true.
        for claim in _NUMERIC_DATES:
            if claim in claims and claims[claim].__class__ not in (int, float):
                return self._reject(exchange, f"invalid_{claim}")
        jti = claims.get("jti")
        if jti is not None and jti in self._denied:
            return self._reject(exchange, "token_revoked")
        entry = self._entry(claims)
        if entry.jti is not None:
            refusal = self._revocation_refusal(exchange, entry.jti)
            if refusal is not None:
                return refusal
        if self._cache_size and entry.expires > _now():
            entry.credential = cache_key
            remember_token(self._cache, cache_key_of(cache_key), entry, self._cache_size)
        self._admit(exchange, entry, source)
        return None

    def _entry(self, claims: dict[str, Any]) -> Entry:
        config = self.config
        try:
            expires = int(claims["exp"]) + self._leeway if "exp" in claims else float("inf")
        except (TypeError, ValueError, OverflowError):
            expires = 0.0  # not cacheable; PyJWT has already judged the token itself
        consumer = claim_text(claims.get(config.consumer_claim)) if config.consumer_claim else None
        tenant = claim_text(claims.get(config.tenant_claim)) if config.tenant_claim else None
        forward = self._forwarding.header_values(claims)
        jti = claims.get("jti") if self._check_revoked else None
        return Entry(
            expires, consumer, tenant, claim_vars(claims), forward, jti if isinstance(jti, str) else None
        )

    def _revocation_refusal(self, exchange: Exchange, jti: str) -> Reply | None:
        """A Reply if the token's jti is revoked at runtime, or if the denylist is not loaded."""
        registry = self.services.consumers
        if registry is None:
            return self._reject(exchange, "revocations_unavailable")  # fail closed
        if registry.token_revoked(jti):
            return self._reject(exchange, "token_revoked")
        return None

    def _admit_cached(self, exchange: Exchange, entry: Entry, source: str = "header") -> Reply | None:
        # A cached token is checked against the denylist on every use: it may be revoked since.
        if entry.jti is not None:
            refusal = self._revocation_refusal(exchange, entry.jti)
            if refusal is not None:
                return refusal
        self._admit(exchange, entry, source)
        return None

    def _admit(self, exchange: Exchange, entry: Entry, source: str = "header") -> None:
        exchange.consumer = entry.consumer
        exchange.tenant = entry.tenant
        self._forwarding.admit(exchange, entry.vars, entry.forward)
        if source != "header" and self.config.strip_credential:
            if source == "cookie":
                self._strip_cookie(exchange)
            else:
                self._strip_query(exchange)

    # -- other places a token can be ----------------------------------------------------------------------
    def _from_cookie(self, exchange: Exchange) -> bytes | None:
        return cookie_value(exchange.headers, self._cookie) or None

    def _strip_cookie(self, exchange: Exchange) -> None:
        wanted = self._cookie
        headers = []
        for key, value in exchange.headers:
            if key == b"cookie":
                kept = [p for p in value.split(b";") if p.strip().partition(b"=")[0] != wanted]
                value = b";".join(kept).strip()
                if not value:
                    continue
            headers.append((key, value))
        exchange.headers = headers

    def _from_query(self, exchange: Exchange) -> bytes | None:
        wanted = self._query
        for part in exchange.query.split(b"&"):
            name, sep, found = part.partition(b"=")
            if sep and unquote_to_bytes(name) == wanted:
                return unquote_to_bytes(found) or None
        return None

    def _strip_query(self, exchange: Exchange) -> None:
        wanted = self._query
        kept = [
            p for p in exchange.query.split(b"&") if p and unquote_to_bytes(p.partition(b"=")[0]) != wanted
        ]
        exchange.query = b"&".join(kept)
