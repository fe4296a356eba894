"""The `oauth2-token` policy: a token endpoint (OAuth 2.0, RFC 6749) that issues short-lived
signed JWTs to consumers, so clients need no separate authorization server.

It answers every request on its route itself (the route needs no upstream). A ``POST`` whose
body is form-urlencoded (RFC 6749 §4.4.2) or JSON asks for a token with a ``grant_type``:

- ``client_credentials`` (§4.4): the client id is a consumer's id and the secret the one stored
  with ``apigate consumers set-secret``; sent as HTTP Basic (§2.3.1, form-encoded before base64)
  or as ``client_id``/``client_secret`` body fields, never both;
- ``password`` (§4.3): ``username`` and ``password`` of a login (``apigate consumers
  set-password``, or a config consumer's ``password_hash`` with its id as username). A route
  that allows only this grant also takes a body without ``grant_type``, such as the JSON login
  ``{"username": ..., "password": ...}`` of a ``POST /api/auth/login``.

``scope`` (space-separated) must be a subset of the credential's scopes; without it the token
carries all of them. The answer is ``{"access_token", "token_type": "Bearer", "expires_in",
"scope"}`` with ``Cache-Control: no-store``. The token is a JWT signed with the configured key
(HS256 secret, or RS256/ES256 private key) with iss, sub (the consumer id), aud, iat, exp, jti,
scope, client_id, and the consumer's tenant and groups: a `jwt` policy with the same key (or its
public half) accepts it, and `authorize` checks its scopes and groups.

Errors follow RFC 6749 §5.2: ``{"error", "error_description"}`` with 400 ``invalid_request``
(naming the field), ``unsupported_grant_type``, ``invalid_scope`` or ``invalid_grant`` (a wrong
username or password), and 401 ``invalid_client`` with ``WWW-Authenticate: Basic``. Secrets are
verified off the event loop (scrypt) and never echoed or logged.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, unquote

import jwt as pyjwt
import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import Field, SecretStr, field_validator, model_validator

from apigate.config.units import Duration
from apigate.consumers.passwords import PasswordChecksBusy, check_password_off_loop
from apigate.engine.replies import Reply, json_reply
from apigate.policies.authconfig import check_realm
from apigate.policies.base import Policy, PolicyConfig
from apigate.policies.basic_auth import MalformedBasic, parse_basic
from apigate.policies.jwt.keys import HMAC_MIN_BYTES
from apigate.policies.registry import register

if TYPE_CHECKING:
    from apigate.consumers.registry import ConsumerRegistry, Login
    from apigate.engine.exchange import Exchange
    from apigate.store.roles.consumers import Consumer

Grant = Literal["client_credentials", "password"]

# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
MAX_FIELD_CHARS = 4096  # any one body field; more is not a credential
_NO_STORE = [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]
_FORM = b"application/x-www-form-urlencoded"
_JSON = b"application/json"


class TokenConfig(PolicyConfig):
    grants: list[Grant] = Field(default_factory=lambda: ["client_credentials"], min_length=1)
    algorithm: Literal["HS256", "RS256", "ES256"] = "HS256"
    secret: SecretStr | None = Field(default=None, description="HS256 signing secret (32 bytes or more)")
    private_key: SecretStr | None = Field(default=None, description="PEM private key for RS256/ES256")
    private_key_file: str | None = Field(default=None, description="path to a PEM private key")
    key_id: str | None = Field(default=None, description="kid header, to pick the key out of a JWKS")
    issuer: str = Field(default="apigate", min_length=1, description="iss of every token")
    audience: str | list[str] | None = Field(default=None, description="aud of every token")
    token_ttl: Duration = Field(default=300.0, ge=10, le=86400, description="lifetime of a token")
    realm: str = "apigate"

    _realm = field_validator("realm")(classmethod(lambda cls, v: check_realm(v)))

    @field_validator("grants")
    @classmethod
    def _grants(cls, grants: list[str]) -> list[str]:
        return list(dict.fromkeys(grants))

    @model_validator(mode="after")
    def _key_fits_algorithm(self) -> TokenConfig:
        if self.private_key is not None and self.private_key_file is not None:
            raise ValueError("set private_key or private_key_file, not both")
        has_private = self.private_key is not None or self.private_key_file is not None
        if self.algorithm == "HS256":
            if self.secret is None:
                raise ValueError("algorithm HS256 needs a secret")
            if has_private:
                raise ValueError("a private key is set but algorithm is HS256 (use RS256 or ES256)")
            if len(self.secret.get_secret_value().encode()) < HMAC_MIN_BYTES["HS256"]:
                raise ValueError(f"secret must be at least {HMAC_MIN_BYTES['HS256']} bytes for HS256")
        else:
            if self.secret is not None:
                raise ValueError(f"secret is set but algorithm is {self.algorithm} (use HS256)")
            if not has_private:
                raise ValueError(f"algorithm {self.algorithm} needs private_key or private_key_file")
            signing_key(self)  # fails with the reason if the key does not fit
        return self


def _private_pem(config: TokenConfig) -> bytes:
    if config.private_key is not None:
        return config.private_key.get_secret_value().encode()
    assert config.private_key_file is not None
    try:
        return Path(config.private_key_file).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read private_key_file: {exc.strerror or type(exc).__name__}") from None


def signing_key(config: TokenConfig) -> Any:
    """The key tokens are signed with; ValueError (never quoting the key) if it does not fit."""
    if config.algorithm == "HS256":
        assert config.secret is not None
        return config.secret.get_secret_value().encode()
    pem = _private_pem(config)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("the private key is not an unencrypted PEM private key") from None
    if config.algorithm == "RS256" and not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("algorithm RS256 needs an RSA private key")
    if config.algorithm == "ES256" and not (
        isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    ):
        raise ValueError("algorithm ES256 needs an EC P-256 private key")
    return key


class _Refusal(Exception):
    """An RFC 6749 §5.2 error answer."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


def _fields(exchange: Exchange, body: bytes) -> dict[str, str]:
    """The body's parameters (form or JSON); _Refusal naming what is wrong."""
    content_type = (exchange.header(b"content-type") or b"").partition(b";")[0].strip().lower()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refusal("invalid_request", "the body is not UTF-8") from None
    if content_type == _FORM:
        pairs = parse_qsl(text, keep_blank_values=True)
        fields: dict[str, Any] = {}
        for name, value in pairs:
            if name in fields:  # RFC 6749 §3.2: a parameter must not be sent twice
                raise _Refusal("invalid_request", f"{name} is sent more than once")
            fields[name] = value
    elif content_type == _JSON:
        try:
            fields = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            raise _Refusal("invalid_request", "the body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise _Refusal("invalid_request", "the body must be a JSON object")
    else:
        raise _Refusal(
            "invalid_request", "the body must be application/x-www-form-urlencoded or application/json"
        )
    for name, value in fields.items():
        if not isinstance(value, str):
            raise _Refusal("invalid_request", f"{name} must be a string")
        if len(value) > MAX_FIELD_CHARS:
            raise _Refusal("invalid_request", f"{name} is too long")
    return fields


def _required(fields: dict[str, str], name: str) -> str:
    value = fields.get(name)
    if not value:
        raise _Refusal("invalid_request", f"{name} is required")
    return value


@register
class TokenPolicy(Policy[TokenConfig]):
    name = "oauth2-token"
    order = 9000  # after limits and IP rules on the route: it answers last
    phases = frozenset({"request", "body"})
    needs = frozenset({"consumers"})
    terminal = True
    body_limit = 64 * 1024

    def prepare(self) -> None:
        config = self.config
        self.clock: Callable[[], float] = time.time
        self._key = signing_key(config)
        self._headers = {"kid": config.key_id} if config.key_id else None
        self._grants = frozenset(config.grants)
        self._only_grant = config.grants[0] if len(config.grants) == 1 else None
        self._ttl = int(config.token_ttl)
        self._invalid_client = [(b"www-authenticate", f'Basic realm="{config.realm}"'.encode()), *_NO_STORE]

    # -- hooks ---------------------------------------------------------------------------------------
    def on_request(self, exchange: Exchange) -> Reply | None:
        if exchange.method != "POST":
            payload = {"error": "invalid_request", "error_description": "tokens are requested with POST"}
            return json_reply(405, {**payload, "request_id": exchange.request_id}, [(b"allow", b"POST")])
        return None  # the engine now reads the body for on_body

    def on_body(self, exchange: Exchange, body: bytes) -> Reply | Coroutine[Any, Any, Reply] | None:
        registry = self.services.consumers
        if registry is None:  # answered in OAuth's error form (RFC 6749 §5.2), as every refusal here
            payload = {"error": "temporarily_unavailable", "error_description": "consumers are not loaded"}
            return json_reply(503, {**payload, "request_id": exchange.request_id}, [(b"retry-after", b"1")])
        try:
            fields = _fields(exchange, body)
            grant = fields.get("grant_type") or self._only_grant
            if grant is None:
                raise _Refusal("invalid_request", "grant_type is required")
            if grant not in self._grants:
                raise _Refusal("unsupported_grant_type", "this endpoint does not issue that grant_type")
            if grant == "client_credentials":
                client_id, secret = self._client_credentials(exchange, fields)
                login = registry.client_secret(client_id)
                return self._issue(exchange, registry, grant, login, secret, fields, "invalid_client")
            username, password = _required(fields, "username"), _required(fields, "password")
            login = registry.login(username)
            return self._issue(exchange, registry, grant, login, password, fields, "invalid_grant")
        except _Refusal as refusal:
            return self._refuse(exchange, refusal)

    # -- the grants -----------------------------------------------------------------------------------
    def _client_credentials(self, exchange: Exchange, fields: dict[str, str]) -> tuple[str, str]:
        authorization = exchange.header(b"authorization")
        try:
            basic = parse_basic(authorization) if authorization is not None else None
        except MalformedBasic:
            raise _Refusal("invalid_client", "the Authorization header cannot be read") from None
        in_body = "client_id" in fields or "client_secret" in fields
        if basic is not None:
            if in_body:  # RFC 6749 §2.3: one authentication method per request
                raise _Refusal("invalid_request", "send the client credentials in Authorization or the body")
            return unquote(basic[0]), unquote(basic[1].decode())
        if not in_body:
            raise _Refusal("invalid_client", "client authentication is required")
        return _required(fields, "client_id"), _required(fields, "client_secret")

    async def _issue(
        self,
        exchange: Exchange,
        registry: ConsumerRegistry,
        grant: str,
        login: Login | None,
        secret: str,
        fields: dict[str, str],
        failure: str,
    ) -> Reply:
        # Unknown names cost a verification too, so timing does not tell which exist.
        try:
            ok = await check_password_off_loop(login.hash if login is not None else None, secret.encode())
        except PasswordChecksBusy:
            payload = {
                "error": "temporarily_unavailable",
                "error_description": "too many credential checks in flight, try again",
                "request_id": exchange.request_id,
            }
            return json_reply(503, payload, [*_NO_STORE, (b"retry-after", b"1")])
        consumer = registry.consumer(login.consumer_id) if ok and login is not None else None
        try:
            if login is None or consumer is None or consumer.disabled:
                if failure == "invalid_client":
                    raise _Refusal("invalid_client", "the client id or secret is not valid")
                raise _Refusal("invalid_grant", "the username or password is not valid")
            scopes = self._granted(fields.get("scope"), login.scopes)
        except _Refusal as refusal:
            return self._refuse(exchange, refusal)
        token = self._token(consumer, grant, scopes, fields.get("username"))
        payload = {"access_token": token, "token_type": "Bearer", "expires_in": self._ttl, "scope": scopes}
        return json_reply(200, payload, list(_NO_STORE))

    @staticmethod
    def _granted(requested: str | None, allowed: frozenset[str]) -> str:
        """The scope the token carries: what was asked (all of it allowed), else all allowed."""
        if requested is None:
            return " ".join(sorted(allowed))
        wanted = requested.split(" ")
        if not all(_SCOPE_TOKEN.fullmatch(scope) for scope in wanted):
            raise _Refusal("invalid_scope", "scope must be scope names separated by single spaces")
        if not set(wanted) <= allowed:
            raise _Refusal("invalid_scope", "the requested scope exceeds what this client may have")
        return " ".join(dict.fromkeys(wanted))

    def _token(self, consumer: Consumer, grant: str, scopes: str, username: str | None) -> str:
        config = self.config
        now = int(self.clock())
        claims: dict[str, Any] = {
            "iss": config.issuer,
            "sub": consumer.id,
            "iat": now,
            "exp": now + self._ttl,
            "jti": secrets.token_urlsafe(16),
            "scope": scopes,
            "client_id": consumer.id,
        }
        if config.audience is not None:
            claims["aud"] = config.audience
        if consumer.tenant is not None:
            claims["tenant"] = consumer.tenant
        if consumer.groups:
            claims["groups"] = list(consumer.groups)
        if grant == "password" and username is not None:
            claims["username"] = username
        return pyjwt.encode(claims, self._key, algorithm=config.algorithm, headers=self._headers)

    # -- answers ----------------------------------------------------------------------------------------
    def _refuse(self, exchange: Exchange, refusal: _Refusal) -> Reply:
        status = 401 if refusal.error == "invalid_client" else 400
        headers = self._invalid_client if status == 401 else list(_NO_STORE)
        payload = {
            "error": refusal.error,
            "error_description": refusal.description,
            "request_id": exchange.request_id,
        }
        return json_reply(status, payload, headers)
