"""Helpers for the jwt policy tests: real keys, signed tokens, and a JWKS / OIDC discovery server.

Keys are generated with `cryptography`. Tokens are signed with PyJWT, or with `joserfc` (an
independent JOSE implementation, used as an oracle when installed). ``JwksServer`` is a small
threaded HTTP server on 127.0.0.1 that serves whatever key set the test gives it, the OIDC
discovery document of its issuer, and counts the fetches.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.support.threaded_server import JsonHandler, ThreadedServer

try:
    import joserfc.jwk as _jose_jwk
    import joserfc.jwt as _jose_jwt
except ImportError:  # optional: the tests fall back to PyJWT alone
    _jose_jwk = _jose_jwt = None

HAVE_JOSERFC = _jose_jwt is not None

ASYMMETRIC = ("RS256", "PS256", "ES256", "ES384", "EdDSA")
SYMMETRIC = ("HS256", "HS384", "HS512")
HS_SECRET = "0123456789abcdef" * 4 + "-hs512-needs-64-bytes"  # 85 bytes: enough for HS512


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _private_key(alg: str) -> Any:
    if alg.startswith(("RS", "PS")):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(alg)


@dataclass
class SigningKey:
    """A private key with its kid and alg; signs tokens and describes its public half."""

    alg: str
    kid: str
    private: Any = None

    @classmethod
    def generate(cls, alg: str, kid: str | None = None) -> SigningKey:
        return cls(alg, kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}", _private_key(alg))

    @property
    def public_pem(self) -> str:
        return (
            self.private.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    @property
    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def jwk(self, with_alg: bool = True) -> dict[str, Any]:
        """The public JWK (made by joserfc when installed, so the gateway parses a foreign JWK)."""
        if HAVE_JOSERFC:
            key = _jose_key(self.alg, self.private_pem)
            data = dict(key.as_dict(private=False))
        else:
            algorithm = jwt.get_algorithm_by_name(self.alg)
            data = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        data = {k: v for k, v in data.items() if k not in ("key_ops", "kid", "alg", "use")}
        data.update(kid=self.kid, use="sig")
        if with_alg:
            data["alg"] = self.alg
        return data

    def sign(self, claims: dict[str, Any], *, kid: Any = ..., headers: dict[str, Any] | None = None) -> str:
        extra = {"kid": self.kid if kid is ... else kid, **(headers or {})}
        if extra["kid"] is None:
            del extra["kid"]
        return jwt.encode(claims, self.private, algorithm=self.alg, headers=extra)

    def sign_joserfc(self, claims: dict[str, Any]) -> str:
        assert HAVE_JOSERFC
        return jose_sign({"alg": self.alg, "kid": self.kid}, claims, _jose_key(self.alg, self.private_pem))


def _jose_key(alg: str, private_pem: bytes) -> Any:
    if alg.startswith(("RS", "PS")):
        return _jose_jwk.RSAKey.import_key(private_pem)
    if alg.startswith("ES"):
        return _jose_jwk.ECKey.import_key(private_pem)
    return _jose_jwk.OKPKey.import_key(private_pem)


def jose_sign(header: dict[str, Any], claims: dict[str, Any], key: Any) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joserfc flags "EdDSA" as deprecated (RFC 9864)
        return _jose_jwt.encode(header, claims, key, algorithms=[header["alg"]])


def hs_sign(claims: dict[str, Any], alg: str = "HS256", secret: str = HS_SECRET, **headers: Any) -> str:
    return jwt.encode(claims, secret, algorithm=alg, headers=headers or None)


def hs_sign_joserfc(claims: dict[str, Any], alg: str, secret: str = HS_SECRET) -> str:
    return jose_sign({"alg": alg}, claims, _jose_jwk.OctKey.import_key(secret.encode()))


def forge_hmac(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 token made by hand (PyJWT refuses PEM text as an HMAC key, an attacker does not)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def unsigned(claims: dict[str, Any], alg: str = "none", signature: str = "") -> str:
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"sub": "alice", "iat": now, "exp": now + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


# -- the JWKS / OIDC server --------------------------------------------------------------------------
@dataclass
class JwksServer(ThreadedServer):
    """Serves ``{prefix}/jwks.json`` and ``{prefix}/.well-known/openid-configuration`` on 127.0.0.1."""

    prefix: str = "/realms/test"
    keys: list[dict[str, Any]] = field(default_factory=list)
    fetches: dict[str, int] = field(default_factory=dict)
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks.json"

    @property
    def jwks_fetches(self) -> int:
        with self._lock:
            return self.fetches.get(f"{self.prefix}/jwks.json", 0)

    @property
    def discovery_fetches(self) -> int:
        with self._lock:
            return self.fetches.get(f"{self.prefix}/.well-known/openid-configuration", 0)

    def serve(self, *keys: SigningKey) -> None:
        """Publish exactly these keys from now on."""
        with self._lock:
            self.keys = [key.jwk() for key in keys]

    def start(self) -> JwksServer:
        server = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.fetches[self.path] = server.fetches.get(self.path, 0) + 1
                    keys = list(server.keys)
                if self.path == f"{server.prefix}/jwks.json":
                    self.send_json(200, {"keys": keys})
                elif self.path == f"{server.prefix}/.well-known/openid-configuration":
                    self.send_json(200, {"issuer": server.issuer, "jwks_uri": server.jwks_url})
                else:
                    self.send_json(404, {"error": "not found"})

        self.listen(Handler)
        return self
