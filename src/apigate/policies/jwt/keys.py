"""Where the jwt policy's verification keys come from.

Static keys (an HS secret, a PEM public key or certificate) are loaded once when the policy is
built. A ``KeySet`` holds the keys of a JWKS document fetched over HTTP, directly from
``jwks_url`` or through OIDC discovery (``{issuer}/.well-known/openid-configuration`` names
the ``jwks_uri``). A KeySet:

- fetches asynchronously (the pooled ``apigate.outbound`` client; nothing blocks the data
  plane), one fetch at a time: concurrent requests that need keys wait for the same fetch;
- refreshes every ``refresh`` seconds on a loop timer, and on a ``kid`` it does not know, at
  most once per ``min_refetch`` seconds (a flood of made-up kids costs one fetch per interval);
- tells its listeners when a key was removed or replaced, so verified-token caches drop
  tokens that the old key had vouched for;
- is shared by every policy instance with the same source and timings (a global jwt policy is
  built once per route, and a reload builds new instances): one fetcher, one timer.

The timer holds only a weak reference: when no policy uses a KeySet any more it is collected
and its timer stops re-arming.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from apigate.outbound import HttpClient, OutboundError, default_tls_context

log = logging.getLogger("apigate.jwt")

# alg -> (JWK key type, curve or None for "any curve of that type").
ALGORITHMS: dict[str, tuple[str, str | None]] = {
    "HS256": ("oct", None),
    "HS384": ("oct", None),
    "HS512": ("oct", None),
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}
# RFC 7518 §3.2: an HMAC key must be at least as long as the hash output.
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_PRIVATE = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

MAX_DOCUMENT_BYTES = 1024 * 1024  # a JWKS or discovery document larger than this is refused
EMPTY_RETRY = 1.0  # while no key was ever loaded, a request may start a new fetch this often


def key_kind(key: Any) -> tuple[str, str | None]:
    """(JWK key type, curve) of a cryptography public key."""
    if isinstance(key, rsa.RSAPublicKey):
        return ("RSA", None)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ("EC", _CURVES.get(key.curve.name, key.curve.name))
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("OKP", None)
    return ("unknown", None)


def fits(alg: str, kind: tuple[str, str | None]) -> bool:
    """True when a key of this kind can verify ``alg`` (no RSA key for HS256, no P-384 for ES256...)."""
    want = ALGORITHMS.get(alg)
    if want is None:
        return False
    return want[0] == kind[0] and (want[1] is None or want[1] == kind[1])


def describe_kind(kind: tuple[str, str | None]) -> str:
    return f"{kind[0]} {kind[1]}" if kind[1] else kind[0]


def load_public_key(pem: str | bytes) -> Any:
    """A public key from PEM (a public key or an X.509 certificate); ValueError otherwise.

    Private keys are refused: the gateway only verifies, and a private key in its config is
    a key that leaked. Error messages never include the input.
    """
    data = pem.encode() if isinstance(pem, str) else pem
    if b"PRIVATE KEY-----" in data:
        raise ValueError("is a private key; give the public key (or a certificate) instead")
    try:
        key: Any = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        try:
            key = x509.load_pem_x509_certificate(data).public_key()
        except ValueError:
            raise ValueError("is not a PEM public key or certificate") from None
    if key_kind(key)[0] == "unknown":
        raise ValueError("is a key type that JWT signatures do not use")
    return key


@dataclass(slots=True, frozen=True)
class PublicKey:
    """One verification key: the key object, its kind, and the alg the JWKS pinned it to (if any)."""

    key: Any
    kind: tuple[str, str | None]
    alg: str | None = None
    fingerprint: bytes = b""

    def can_verify(self, alg: str) -> bool:
        return (self.alg is None or self.alg == alg) and fits(alg, self.kind)


def static_key(key: Any) -> PublicKey:
    return PublicKey(key, key_kind(key), None, _fingerprint(key))


def _fingerprint(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def parse_jwks(document: Any) -> tuple[dict[str, PublicKey], list[PublicKey]]:
    """Signature keys of a JWKS document: (by kid, without kid). Unusable keys are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    by_kid: dict[str, PublicKey] = {}
    anonymous: list[PublicKey] = []
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") == "oct":
            continue  # shared secrets are never taken from a URL
        alg = entry.get("alg")
        if alg is not None and alg not in ALGORITHMS:
            continue
        try:
            key = jwt.PyJWK(entry).key
        except (jwt.exceptions.PyJWTError, ValueError, TypeError, KeyError):
            continue
        if isinstance(key, _PRIVATE):
            key = key.public_key()  # a JWKS that (wrongly) publishes private parts: keep the public half
        kind = key_kind(key)
        if kind[0] == "unknown":
            continue
        item = PublicKey(key, kind, alg, _fingerprint(key) + (alg or "").encode())
        kid = entry.get("kid")
        if isinstance(kid, str) and kid:
            by_kid.setdefault(kid, item)
        else:
            anonymous.append(item)
    return by_kid, anonymous


class FetchError(Exception):
    pass


# Key sets and discovery documents of every jwt policy in the process share these pooled
# connections; refreshes are minutes apart, so idle connections close long before the next one.
_client = HttpClient(max_connections_per_origin=2, idle_timeout=30.0)


async def fetch_json(url: str, timeout: float) -> Any:
    """GET a JSON document on the running loop (see ``apigate.outbound``); FetchError on any failure."""
    try:
        response = await _client.request(
            "GET", url, [(b"Accept", b"application/json")], timeout=timeout, max_body=MAX_DOCUMENT_BYTES
        )
    except OutboundError as exc:
        raise FetchError(exc.message) from None
    except ValueError as exc:
        raise FetchError(str(exc)) from None
    if response.status != 200:
        raise FetchError(f"HTTP {response.status}")
    try:
        return orjson.loads(response.body)
    except orjson.JSONDecodeError:
        raise FetchError("not JSON") from None


class KeySet:
    """The keys of one JWKS source, fetched and kept fresh on the running loop."""

    def __init__(
        self,
        jwks_url: str | None,
        discovery: str | None,
        refresh: float,
        min_refetch: float,
        timeout: float,
    ) -> None:
        self.jwks_url = jwks_url
        self.discovery = discovery
        self.refresh = refresh
        self.min_refetch = min_refetch
        self.timeout = timeout
        self.by_kid: dict[str, PublicKey] = {}
        self.anonymous: list[PublicKey] = []
        self.loaded = False
        self.fetches = 0
        self.failures = 0
        self.listeners: weakref.WeakSet[Any] = weakref.WeakSet()
        self._discovered: str | None = None
        self._last_attempt = float("-inf")
        self._last_kid_refetch = float("-inf")
        self._task: asyncio.Task[bool] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def source(self) -> str:
        return self.jwks_url or f"{self.discovery} (OIDC discovery)"

    # -- lookups -----------------------------------------------------------------------------------
    def candidates(self, kid: str | None, alg: str) -> list[PublicKey]:
        """Keys that may have signed a token with this kid and alg (no network)."""
        if kid is not None:
            key = self.by_kid.get(kid)
            return [key] if key is not None and key.can_verify(alg) else []
        # No kid: keys published without one, or the set's only key.
        pool = self.anonymous
        if not pool and len(self.by_kid) == 1:
            pool = list(self.by_kid.values())
        return [key for key in pool if key.can_verify(alg)]

    def knows(self, kid: str | None) -> bool:
        return kid in self.by_kid if kid is not None else bool(self.anonymous or len(self.by_kid) == 1)

    def may_refetch(self, kid: str | None) -> bool:
        """Whether a token naming keys we lack may start (or join) a fetch now."""
        self._bind_loop()
        if self._task is not None:
            return True
        now = time.monotonic()
        if not self.loaded:
            return now - self._last_attempt >= EMPTY_RETRY
        return now - self._last_kid_refetch >= self.min_refetch

    async def refetch(self) -> bool:
        """Fetch now for a kid we lack (callers check ``may_refetch`` first); joins a running fetch."""
        if self._task is None and self.loaded:
            self._last_kid_refetch = time.monotonic()
        return await self.fetch()

    # -- fetching ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin the first fetch now if a loop is running (the gateway builds policies on its loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._bind_loop()
        if self._task is None and not self.loaded:
            self._spawn(rediscover=False)

    async def fetch(self) -> bool:
        self._bind_loop()
        task = self._task or self._spawn(rediscover=False)
        return await asyncio.shield(task)

    def _bind_loop(self) -> None:
        # A KeySet outlives an event loop in tests that run several loops in one process; work
        # started on another loop can never complete on this one.
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._task = None
            self._timer = None

    def _spawn(self, rediscover: bool) -> asyncio.Task[bool]:
        assert self._loop is not None
        task = self._loop.create_task(self._fetch(rediscover))
        self._task = task
        task.add_done_callback(self._fetched)
        return task

    def _fetched(self, task: asyncio.Task[bool]) -> None:
        if self._task is task:
            self._task = None
        ok = not task.cancelled() and task.exception() is None and task.result()
        # After a failure, try again sooner than the regular interval (but not in a tight loop).
        delay = self.refresh if ok else min(self.refresh, max(self.min_refetch, 5.0))
        self._arm(delay)

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        self._timer = loop.call_later(delay, _tick, weakref.ref(self))

    async def _fetch(self, rediscover: bool) -> bool:
        self._last_attempt = time.monotonic()
        self.fetches += 1
        try:
            url = self.jwks_url
            if url is None:
                if self._discovered is None or rediscover:
                    self._discovered = await self._discover()
                url = self._discovered
            by_kid, anonymous = parse_jwks(await fetch_json(url, self.timeout))
        except (FetchError, ValueError) as exc:
            self.failures += 1
            log.warning("jwt: cannot load keys from %s: %s", self.source, exc)
            return False
        except Exception:
            self.failures += 1
            log.exception("jwt: loading keys from %s failed", self.source)
            return False
        self._replace(by_kid, anonymous)
        return True

    async def _discover(self) -> str:
        assert self.discovery is not None
        document = await fetch_json(
            self.discovery.rstrip("/") + "/.well-known/openid-configuration", self.timeout
        )
        if not isinstance(document, dict):
            raise FetchError("discovery document is not a JSON object")
        # OpenID Connect Discovery §4.3: the document must name the issuer it was fetched for.
        if document.get("issuer") != self.discovery:
            raise FetchError("discovery document names a different issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise FetchError("discovery document has no usable jwks_uri")
        return jwks_uri

    def _replace(self, by_kid: dict[str, PublicKey], anonymous: list[PublicKey]) -> None:
        old = {kid: key.fingerprint for kid, key in self.by_kid.items()}
        old_anonymous = {key.fingerprint for key in self.anonymous}
        self.by_kid, self.anonymous, self.loaded = by_kid, anonymous, True
        gone = any(kid not in by_kid or by_kid[kid].fingerprint != fp for kid, fp in old.items())
        gone = gone or bool(old_anonymous - {key.fingerprint for key in anonymous})
        if gone:
            log.info("jwt: keys removed or replaced at %s; cached tokens are verified again", self.source)
            for listener in list(self.listeners):
                listener.keys_removed()


def _tick(ref: weakref.ref[KeySet]) -> None:
    keyset = ref()
    if keyset is None:
        return  # no policy uses this source any more
    keyset._timer = None
    if keyset._task is None:
        keyset._spawn(rediscover=True)


_shared: weakref.WeakValueDictionary[tuple[Any, ...], KeySet] = weakref.WeakValueDictionary()


def shared_keyset(
    jwks_url: str | None, discovery: str | None, refresh: float, min_refetch: float, timeout: float
) -> KeySet:
    """The KeySet for this source and timings, shared by every policy instance that uses it."""
    if (jwks_url or discovery or "").startswith("https://"):
        default_tls_context()  # built while the config is compiled, not on the loop during a fetch
    key = (jwks_url, discovery, refresh, min_refetch, timeout)
    keyset = _shared.get(key)
    if keyset is None:
        keyset = KeySet(jwks_url, discovery, refresh, min_refetch, timeout)
        _shared[key] = keyset
    return keyset
