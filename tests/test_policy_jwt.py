"""The `jwt` policy: real keys, real signatures, a real JWKS / OIDC server and a real gateway.

Tokens are signed with PyJWT and, when installed, with joserfc as an independent oracle (the
gateway verifies with PyJWT, so a joserfc token that passes shows the two agree on the wire
format). Every rejection is checked for its status, challenge and reason code, and for not
echoing the token.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from apigate.consumers.service import REVOKED_TOKEN_GRACE, ConsumerService
from apigate.engine.exchange import Exchange
from apigate.engine.replies import Reply
from apigate.policies.registry import build_policy
from apigate.store.sqlite import SqliteStore
from tests.support.cli import apigate_json, seconds_until
from tests.support.errors_helpers import ClosedPort, apigate_cmd, clean_env, wait_until
from tests.support.exchanges import request_exchange
from tests.support.jwks_server import (
    ASYMMETRIC,
    HAVE_JOSERFC,
    HS_SECRET,
    SYMMETRIC,
    JwksServer,
    SigningKey,
    b64url,
    claims,
    forge_hmac,
    hs_sign,
    hs_sign_joserfc,
    unsigned,
)
from tests.support.proxy_http import RawConnection, running_gateway

ISSUER = "https://issuer.test"
AUDIENCE = "apigate-tests"
NO_PROXY = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
SIGNERS = ["pyjwt", "joserfc"] if HAVE_JOSERFC else ["pyjwt"]


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {alg: SigningKey.generate(alg) for alg in ASYMMETRIC}


@pytest.fixture(scope="module")
def pem_key() -> SigningKey:
    return SigningKey.generate("RS256", kid="pem")


@pytest.fixture(scope="module")
def jwks(keys):
    server = JwksServer().start()
    server.serve(*keys.values())
    yield server
    server.stop()


def _route(prefix: str, target: str, jwt: dict[str, Any]) -> dict[str, Any]:
    return {"path": f"{prefix}/*", "target": target, "strip_prefix": True, "policies": {"jwt": jwt}}


@pytest.fixture(scope="module")
def gateway(shared_upstream, jwks, pem_key, tmp_path_factory):
    url = shared_upstream.url
    claims_checks = {"issuer": ISSUER, "audience": AUDIENCE}
    config = {
        "routes": [
            _route("/hs", url, {"algorithms": list(SYMMETRIC), "secret": HS_SECRET, **claims_checks}),
            _route(
                "/pem",
                url,
                {
                    "algorithms": ["RS256"],
                    "public_key": pem_key.public_pem,
                    "required_claims": ["exp", "sub"],
                    "forward_claims": {"sub": "X-User-ID", "tenant": "X-Tenant-ID", "scope": "X-Scopes"},
                    "denied_jti": ["revoked-1", "12345"],  # a numeric jti must not dodge "12345"
                    **claims_checks,
                },
            ),
            _route(
                "/mixed",
                url,
                {"algorithms": ["RS256", "HS256"], "secret": HS_SECRET, "public_key": pem_key.public_pem},
            ),
            _route(
                "/jwks", url, {"algorithms": list(ASYMMETRIC), "jwks_url": jwks.jwks_url, **claims_checks}
            ),
            _route("/oidc", url, {"algorithms": ["RS256", "ES256"], "issuer_discovery": jwks.issuer}),
            _route(
                "/strip",
                url,
                {"algorithms": ["HS256"], "secret": HS_SECRET, "strip_credential": True},
            ),
            _route(
                "/elsewhere",
                url,
                {
                    "algorithms": ["HS256"],
                    "secret": HS_SECRET,
                    "cookie": "session",
                    "query_param": "access_token",
                    "strip_credential": True,
                },
            ),
        ]
    }
    with running_gateway(tmp_path_factory.mktemp("jwt"), config, env=NO_PROXY) as gw:
        yield gw


def call(port: int, path: str, token: str | None = None, headers: dict[str, str] | None = None):
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    with RawConnection(port) as conn:
        return conn.exchange("GET", path, sent)


def call_raw(port: int, head: bytes):
    with RawConnection(port) as conn:
        conn.send(head)
        return conn.read_response()


def upstream_view(response) -> dict[str, Any]:
    assert response.status == 200, (response.status, response.body)
    return response.json()


def assert_rejected(response, reason: str, token: str | None = None, status: int = 401) -> dict[str, Any]:
    assert response.status == status, (response.status, response.body)
    body = response.json()
    assert body["reason"] == reason, body
    assert body["error"]
    assert body["request_id"] == response.header("x-request-id")
    challenge = response.header("www-authenticate")
    if status == 401:
        expected = 'Bearer realm="apigate"'
        if reason != "missing_token":
            expected += ', error="invalid_token"'
        assert challenge == expected
    if token:
        for part in token.split("."):
            if len(part) >= 8:
                assert part.encode() not in response.body
    return body


def good(**overrides: Any) -> dict[str, Any]:
    return claims(**{"iss": ISSUER, "aud": AUDIENCE, **overrides})


# -- every algorithm with the right key -------------------------------------------------------------
@pytest.mark.parametrize("signer", SIGNERS)
@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_asymmetric_algorithms_from_jwks(gateway, keys, alg, signer):
    key = keys[alg]
    payload = good(sub=f"user-{alg}")
    token = key.sign(payload) if signer == "pyjwt" else key.sign_joserfc(payload)
    assert upstream_view(call(gateway.port, "/jwks/echo", token))["path"] == "/echo"


@pytest.mark.parametrize("signer", SIGNERS)
@pytest.mark.parametrize("alg", SYMMETRIC)
def test_hmac_algorithms(gateway, alg, signer):
    token = hs_sign(good(), alg) if signer == "pyjwt" else hs_sign_joserfc(good(), alg)
    upstream_view(call(gateway.port, "/hs/echo", token))


def test_static_public_key(gateway, pem_key):
    upstream_view(call(gateway.port, "/pem/echo", pem_key.sign(good())))


def test_key_of_another_algorithm_is_refused(gateway, keys):
    # ES256 is not listed on the static-PEM route (RS256 only): refused before any key is used.
    assert_rejected(call(gateway.port, "/pem/echo", keys["ES256"].sign(good())), "invalid_token")
    # An ES384 token naming the kid of the ES256 key: that key is pinned to ES256 (and on the
    # wrong curve), so it is never tried.
    forged = keys["ES384"].sign(good(), kid=keys["ES256"].kid)
    assert_rejected(call(gateway.port, "/jwks/echo", forged), "invalid_token", forged)
    # An RS256 token naming the PS256 key's kid: same RSA key type, but the JWK pins PS256.
    forged = keys["PS256"].sign(good(), headers={"alg": "RS256"})
    assert_rejected(call(gateway.port, "/jwks/echo", forged), "invalid_token", forged)


# -- rejections --------------------------------------------------------------------------------------
def _tamper_payload(token: str) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{b64url(json.dumps(good(sub='mallory')).encode())}.{signature}"


def _tamper_signature(token: str) -> str:
    header, payload, signature = token.split(".")
    flipped = ("A" if signature[5] != "A" else "B").join((signature[:5], signature[6:]))
    return f"{header}.{payload}.{flipped}"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("tampered_payload", "invalid_token"),
        ("tampered_signature", "invalid_token"),
        ("expired", "token_expired"),
        ("not_yet_valid", "token_not_yet_valid"),
        ("issued_in_future", "token_not_yet_valid"),
        ("wrong_issuer", "invalid_issuer"),
        ("missing_issuer", "invalid_issuer"),
        ("wrong_audience", "invalid_audience"),
        ("missing_sub", "missing_claim"),
        ("missing_exp", "missing_claim"),
        ("revoked_jti", "token_revoked"),
        ("numeric_jti", "invalid_token"),  # RFC 7519: a string; PyJWT >= 2.10 refuses other types
        ("jti_of_another_type", "invalid_token"),
    ],
)
def test_invalid_tokens_are_refused_with_a_reason(gateway, pem_key, case, reason):
    now = int(time.time())
    token = {
        "tampered_payload": lambda: _tamper_payload(pem_key.sign(good())),
        "tampered_signature": lambda: _tamper_signature(pem_key.sign(good())),
        "expired": lambda: pem_key.sign(good(iat=now - 600, exp=now - 120)),  # beyond the 30 s leeway
        "not_yet_valid": lambda: pem_key.sign(good(nbf=now + 300)),
        "issued_in_future": lambda: pem_key.sign(good(iat=now + 300)),
        "wrong_issuer": lambda: pem_key.sign(good(iss="https://evil.test")),
        "missing_issuer": lambda: pem_key.sign(good(iss=None)),
        "wrong_audience": lambda: pem_key.sign(good(aud="someone-else")),
        "missing_sub": lambda: pem_key.sign(good(sub=None)),
        "missing_exp": lambda: pem_key.sign(good(exp=None)),
        "revoked_jti": lambda: pem_key.sign(good(jti="revoked-1")),
        "numeric_jti": lambda: pem_key.sign(good(jti=12345)),
        "jti_of_another_type": lambda: pem_key.sign(good(jti=["revoked-1"])),
    }[case]()
    assert_rejected(call(gateway.port, "/pem/echo", token), reason, token)


def test_leeway_accepts_a_token_that_just_expired(gateway, pem_key):
    now = int(time.time())
    upstream_view(call(gateway.port, "/pem/echo", pem_key.sign(good(iat=now - 60, exp=now - 5))))


def test_audience_list_in_token(gateway, pem_key):
    token = pem_key.sign(good(aud=["other", AUDIENCE]))
    upstream_view(call(gateway.port, "/pem/echo", token))


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(gateway, alg):
    for path in ("/pem/echo", "/hs/echo", "/jwks/echo"):
        for signature in ("", "c2lnbmF0dXJl"):
            token = unsigned(good(), alg, signature)
            assert_rejected(call(gateway.port, path, token), "invalid_token", token)


def test_algorithm_confusion_is_refused(gateway, pem_key):
    # The classic attack: an HS256 token whose HMAC key is the server's RSA public key (PEM).
    for pem in (pem_key.public_pem, pem_key.public_pem.strip()):
        forged = forge_hmac({"alg": "HS256", "typ": "JWT"}, good(), pem.encode())
        assert_rejected(call(gateway.port, "/pem/echo", forged), "invalid_token", forged)
        # Also where HS256 is allowed: HS tokens are checked with the secret, never the public key.
        assert_rejected(call(gateway.port, "/mixed/echo", forged), "invalid_token", forged)
    # The mixed route itself works with both kinds of token.
    upstream_view(call(gateway.port, "/mixed/echo", pem_key.sign(claims())))
    upstream_view(call(gateway.port, "/mixed/echo", hs_sign(claims())))


def test_algorithm_not_listed_is_refused(gateway):
    token = hs_sign(good(), "HS256")
    assert_rejected(call(gateway.port, "/jwks/echo", token), "invalid_token", token)
    assert_rejected(call(gateway.port, "/pem/echo", token), "invalid_token", token)


def test_missing_token(gateway):
    body = assert_rejected(call(gateway.port, "/pem/echo"), "missing_token")
    assert "token" in body["error"]
    # Another scheme is no bearer token either.
    assert_rejected(call(gateway.port, "/pem/echo", headers={"Authorization": "Basic YTpi"}), "missing_token")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Bearer",
        "Bearer   ",
        "Bearer garbage",
        "Bearer a.b",
        "Bearer a.b.c",
        "Bearer a.b.c.d.e",
        "Bearer !!!.???.***",
        f"Bearer {b64url(b'[1,2]')}.{b64url(b'{}')}.c2ln",
        f"Bearer {b64url(b'not json')}.{b64url(b'{}')}.c2ln",
        f"Bearer {b64url(json.dumps({'alg': 'RS256', 'kid': 7}).encode())}.{b64url(b'{}')}.c2ln",
        f"Bearer {b64url(json.dumps({'alg': ['RS256']}).encode())}.{b64url(b'{}')}.c2ln",
        f"Bearer {b64url(json.dumps({'alg': 'RS256'}).encode())}.{b64url(b'[]')}.c2ln",
        "Bearer eyJ.eyJ.sig with spaces",
    ],
)
def test_malformed_authorization_headers(gateway, value):
    response = call(gateway.port, "/pem/echo", headers={"Authorization": value})
    assert_rejected(response, "invalid_token")


def test_non_ascii_authorization_header(gateway):
    head = (
        b"GET /pem/echo HTTP/1.1\r\nHost: gateway.test\r\n"
        b"Authorization: Bearer \xc3\xa9t\xc3\xa9.\xff\xfe.abc\r\n\r\n"
    )
    assert_rejected(call_raw(gateway.port, head), "invalid_token")


def test_two_authorization_headers_are_refused(gateway, pem_key):
    token = pem_key.sign(good())
    head = (
        b"GET /pem/echo HTTP/1.1\r\nHost: gateway.test\r\n"
        b"Authorization: Bearer %s\r\nAuthorization: Bearer forged\r\n\r\n" % token.encode()
    )
    assert_rejected(call_raw(gateway.port, head), "invalid_token", token)


def test_token_too_large(gateway, pem_key):
    # Over max_token_bytes (8 KiB) but under the gateway's 32 KiB header limit: the policy answers.
    token = pem_key.sign(good(padding="x" * 10_000))
    assert 8192 < len(token) < 30_000
    assert_rejected(call(gateway.port, "/pem/echo", token), "token_too_large", token)
    # 100 KB is over the header limit: the gateway refuses the head itself before any policy runs.
    huge = pem_key.sign(good(padding="x" * 100_000))
    assert call(gateway.port, "/pem/echo", huge).status == 431


# -- what a valid token does -------------------------------------------------------------------------
def test_forwarded_claims_replace_spoofed_headers(gateway, pem_key):
    token = pem_key.sign(good(sub="alice", tenant="acme", scope="read write"))
    spoof = {"X-User-ID": "mallory", "x-tenant-id": "evil", "X-Scopes": "admin"}
    seen = upstream_view(call(gateway.port, "/pem/echo", token, spoof))["headers"]
    assert seen["x-user-id"] == "alice"
    assert seen["x-tenant-id"] == "acme"
    assert seen["x-scopes"] == "read write"
    assert seen["authorization"] == f"Bearer {token}"  # strip_credential is off here
    # A claim the token lacks still clears the client's header of that name.
    token = pem_key.sign(good(sub="bob"))
    seen = upstream_view(call(gateway.port, "/pem/echo", token, spoof))["headers"]
    assert seen["x-user-id"] == "bob"
    assert "x-tenant-id" not in seen
    assert "x-scopes" not in seen
    # Served again from the cache: the same replacement happens.
    seen = upstream_view(call(gateway.port, "/pem/echo", token, {"X-User-ID": "mallory"}))["headers"]
    assert seen["x-user-id"] == "bob"


def test_strip_credential_removes_authorization(gateway):
    token = hs_sign(claims())
    for _ in range(2):  # first verified, then from the cache
        seen = upstream_view(call(gateway.port, "/strip/echo", token))["headers"]
        assert "authorization" not in seen


def test_token_in_cookie_or_query_param(gateway):
    token = hs_sign(claims())
    for _ in range(2):
        view = upstream_view(
            call(gateway.port, "/elsewhere/echo", headers={"Cookie": f"theme=dark; session={token}; x=1"})
        )
        assert view["headers"]["cookie"] == "theme=dark; x=1"  # the token cookie is stripped
        view = upstream_view(call(gateway.port, f"/elsewhere/echo?a=1&access_token={token}&b=2"))
        assert view["query"] == "a=1&b=2"
    assert_rejected(call(gateway.port, "/elsewhere/echo?access_token=nope.nope.nope"), "invalid_token")
    assert_rejected(call(gateway.port, "/elsewhere/echo?other=1"), "missing_token")


def test_oidc_discovery(gateway, jwks, keys):
    for alg in ("RS256", "ES256"):
        token = keys[alg].sign(claims(iss=jwks.issuer))
        upstream_view(call(gateway.port, "/oidc/echo", token))
    assert jwks.discovery_fetches >= 1
    # The expected issuer defaults to the discovered one.
    token = keys["RS256"].sign(claims(iss=ISSUER))
    assert_rejected(call(gateway.port, "/oidc/echo", token), "invalid_issuer", token)


def test_routes_endpoint_masks_the_secret(gateway):
    response = call(gateway.port, "/routes")
    assert response.status == 200
    assert HS_SECRET.encode() not in response.body
    assert b'"jwt"' in response.body


# -- JWKS rotation, refetch limits and the verified-token cache ----------------------------------------
def _jwks_gateway(start_gateway, upstream, jwks: JwksServer, **jwt: Any):
    config = {"routes": [_route("/api", upstream.url, {"jwks_url": jwks.jwks_url, **jwt})]}
    gw = start_gateway(config, env=NO_PROXY)
    wait_until(lambda: jwks.jwks_fetches >= 1, message="the gateway's first JWKS fetch")
    return gw


@pytest.fixture
def own_jwks():
    server = JwksServer(prefix="").start()
    yield server
    server.stop()


def test_key_rotation_and_refetch_rate_limit(start_gateway, upstream, own_jwks):
    key_a = SigningKey.generate("RS256", kid="key-a")
    key_b = SigningKey.generate("RS256", kid="key-b")
    own_jwks.serve(key_a)
    gw = _jwks_gateway(start_gateway, upstream, own_jwks, jwks_min_refetch_interval="60s")
    upstream_view(call(gw.port, "/api/echo", key_a.sign(claims())))
    assert own_jwks.jwks_fetches == 1

    own_jwks.serve(key_a, key_b)  # the issuer publishes a new key and starts signing with it
    upstream_view(call(gw.port, "/api/echo", key_b.sign(claims())))
    assert own_jwks.jwks_fetches == 2  # the unknown kid caused one refetch

    # A flood of made-up kids within the refetch interval: refused without hammering the JWKS.
    for index in range(20):
        token = key_b.sign(claims(), kid=f"made-up-{index}")
        assert_rejected(call(gw.port, "/api/echo", token), "unknown_key", token)
    assert own_jwks.jwks_fetches <= 3
    # Known keys still work.
    upstream_view(call(gw.port, "/api/echo", key_a.sign(claims())))
    upstream_view(call(gw.port, "/api/echo", key_b.sign(claims())))


def test_removed_key_fails_after_refresh(start_gateway, upstream, own_jwks):
    key_a = SigningKey.generate("ES256", kid="old")
    key_b = SigningKey.generate("ES256", kid="new")
    own_jwks.serve(key_a)
    gw = _jwks_gateway(start_gateway, upstream, own_jwks, algorithms=["ES256"], jwks_refresh_interval="1s")
    token_a = key_a.sign(claims())
    upstream_view(call(gw.port, "/api/echo", token_a))  # verified, and now cached
    own_jwks.serve(key_b)
    # The periodic refresh drops key "old": its token fails even though it was cached.
    wait_until(
        lambda: call(gw.port, "/api/echo", token_a).status == 401,
        timeout=15,
        message="the token of a removed key to be refused",
    )
    assert_rejected(call(gw.port, "/api/echo", token_a), "unknown_key", token_a)
    upstream_view(call(gw.port, "/api/echo", key_b.sign(claims())))


def test_verified_tokens_and_keys_survive_a_jwks_outage(start_gateway, upstream, own_jwks):
    key = SigningKey.generate("PS256", kid="only")
    own_jwks.serve(key)
    gw = _jwks_gateway(
        start_gateway, upstream, own_jwks, algorithms=["PS256"], jwks_min_refetch_interval="1s"
    )
    token = key.sign(claims())
    upstream_view(call(gw.port, "/api/echo", token))
    own_jwks.stop()
    for _ in range(3):
        upstream_view(call(gw.port, "/api/echo", token))
    upstream_view(call(gw.port, "/api/echo", key.sign(claims(sub="new-token"))))  # known key, in memory
    unknown = key.sign(claims(), kid="unknown")
    assert_rejected(call(gw.port, "/api/echo", unknown), "unknown_key", unknown)


def test_jwks_unreachable_from_the_start(start_gateway, upstream):
    closed = ClosedPort()
    try:
        config = {"routes": [_route("/api", upstream.url, {"jwks_url": f"{closed.url}/jwks.json"})]}
        gw = start_gateway(config, env=NO_PROXY)
        token = SigningKey.generate("RS256").sign(claims())
        response = call(gw.port, "/api/echo", token)
        assert_rejected(response, "keys_unavailable", token, status=503)
        assert response.header("retry-after")
    finally:
        closed.close()


# -- in process: the cache itself ----------------------------------------------------------------------
def _bearer(token: str) -> Exchange:
    return request_exchange([(b"authorization", f"Bearer {token}".encode())])


def _run_without_suspending(result: Any) -> Any:
    """The hook's decision: None or a Reply as is; an awaitable must finish without yielding."""
    if result is None or isinstance(result, Reply):
        return result
    coroutine = result
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise AssertionError("the hook awaited")


def test_cache_hit_needs_no_signature_check_and_no_await(monkeypatch):
    import apigate.policies.jwt as module

    policy = build_policy("jwt", {"algorithms": ["HS256"], "secret": HS_SECRET})
    token = hs_sign(claims(sub="carol", tenant="t1", scope="a b", scp=["c"], roles=["admin"]))
    first = _bearer(token)
    assert _run_without_suspending(policy.on_request(first)) is None
    calls: list[Any] = []
    real_decode = module.pyjwt.decode
    monkeypatch.setattr(module.pyjwt, "decode", lambda *a, **k: calls.append(a) or real_decode(*a, **k))
    again = _bearer(token)
    assert _run_without_suspending(policy.on_request(again)) is None
    assert policy.check(_bearer(token)) is None  # the sync entry point, for an engine that uses it
    assert calls == []  # no verification on a hit
    assert again.consumer == "carol" and again.tenant == "t1"
    assert again.state["scopes"] == frozenset({"a", "b", "c"})
    assert again.state["roles"] == frozenset({"admin"})
    assert again.state["claims"]["sub"] == "carol"
    # A different token is verified.
    assert _run_without_suspending(policy.on_request(_bearer(hs_sign(claims(sub="dave"))))) is None
    assert len(calls) == 1


def test_cached_token_expires_with_its_exp(monkeypatch):
    import apigate.policies.jwt as module
    import apigate.policies.jwt.hotpath as hotpath

    policy = build_policy("jwt", {"algorithms": ["HS256"], "secret": HS_SECRET, "leeway": 0})
    now = time.time()
    token = hs_sign(claims(exp=int(now) + 60))
    assert _run_without_suspending(policy.on_request(_bearer(token))) is None
    monkeypatch.setattr(module, "_now", lambda: now + 120)
    monkeypatch.setattr(hotpath, "_now", lambda: now + 120)
    monkeypatch.setattr(module.pyjwt.api_jwt, "datetime", _FrozenDatetime(now + 120))
    reply = _run_without_suspending(policy.on_request(_bearer(token)))
    assert reply.status == 401 and json.loads(reply.body)["reason"] == "token_expired"


class _FrozenDatetime:
    """Stands in for PyJWT's ``datetime`` so its claim checks see a moved clock."""

    def __init__(self, timestamp: float) -> None:
        import datetime

        self._now = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)

    def now(self, tz: Any = None) -> Any:
        return self._now


def test_cache_is_bounded():
    policy = build_policy("jwt", {"algorithms": ["HS256"], "secret": HS_SECRET, "cache_size": 3})
    tokens = [hs_sign(claims(sub=f"user-{i}")) for i in range(6)]
    for token in tokens:
        assert _run_without_suspending(policy.on_request(_bearer(token))) is None
    assert len(policy._cache) == 3
    assert {entry.credential for entry in policy._cache.values()} == {
        f"Bearer {t}".encode() for t in tokens[-3:]
    }


def test_a_cached_signature_on_another_payload_is_verified_and_refused():
    """The cache is keyed by a token's last bytes (its signature): a forged token that reuses a
    cached token's signature with another payload finds that entry, but not as its own."""
    policy = build_policy("jwt", {"algorithms": ["HS256"], "secret": HS_SECRET})
    token = hs_sign(claims(sub="alice"))
    assert _run_without_suspending(policy.on_request(_bearer(token))) is None
    header, _, signature = token.split(".")
    forged = f"{header}.{b64url(json.dumps(claims(sub='admin')).encode())}.{signature}"
    exchange = _bearer(forged)
    reply = _run_without_suspending(policy.on_request(exchange))
    assert reply is not None and reply.status == 401 and exchange.consumer is None
    assert json.loads(reply.body)["reason"] == "invalid_token"
    again = _bearer(token)
    assert _run_without_suspending(policy.on_request(again)) is None and again.consumer == "alice"


def test_a_token_from_a_cookie_is_remembered_as_its_bearer_header(monkeypatch):
    """One cache entry per token, whichever carrier brought it; a bare token in Authorization is
    not a credential, cached or not."""
    import apigate.policies.jwt as module

    policy = build_policy("jwt", {"algorithms": ["HS256"], "secret": HS_SECRET, "cookie": "session"})
    token = hs_sign(claims(sub="carol"))
    from_cookie = request_exchange([(b"cookie", f"theme=dark; session={token}".encode())])
    assert _run_without_suspending(policy.on_request(from_cookie)) is None
    assert from_cookie.consumer == "carol"
    calls: list[Any] = []
    real_decode = module.pyjwt.decode
    monkeypatch.setattr(module.pyjwt, "decode", lambda *a, **k: calls.append(a) or real_decode(*a, **k))
    bare = request_exchange([(b"authorization", token.encode())])
    reply = _run_without_suspending(policy.on_request(bare))
    assert reply is not None and json.loads(reply.body)["reason"] == "missing_token"
    assert _run_without_suspending(policy.on_request(_bearer(token))) is None
    again = request_exchange([(b"cookie", f"session={token}".encode())])
    assert _run_without_suspending(policy.on_request(again)) is None and again.consumer == "carol"
    assert calls == [] and len(policy._cache) == 1


def test_concurrent_unknown_kids_share_one_fetch(own_jwks):
    key = SigningKey.generate("EdDSA", kid="ed")
    own_jwks.serve(key)

    async def main() -> list[Any]:
        policy = build_policy(
            "jwt", {"algorithms": ["EdDSA"], "jwks_url": own_jwks.jwks_url, "jwks_min_refetch_interval": 60}
        )
        token = key.sign(claims())

        async def decide() -> Any:
            result = policy.on_request(_bearer(token))
            return result if result is None or isinstance(result, Reply) else await result

        return await asyncio.gather(*(decide() for _ in range(10)))

    assert asyncio.run(main()) == [None] * 10
    assert own_jwks.jwks_fetches == 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n{"keys": []}', {"keys": []}),
        (b'HTTP/1.1 200 OK\r\n\r\n{"keys": [1]}', {"keys": [1]}),  # ended by the close
        (
            b'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{"a\r\n4\r\n":1}\r\n0\r\n\r\n',
            {"a": 1},
        ),
        (b'HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{"keys": []}', "before the response was complete"),
        (b"HTTP/1.1 302 Found\r\nlocation: /elsewhere\r\ncontent-length: 0\r\n\r\n", "HTTP 302"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nnot json!", "not JSON"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "invalid HTTP response"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * (1024 * 1024 + 10), "too large"),
        (None, "timed out"),
    ],
)
def test_key_fetch_client(raw, expected):
    from apigate.policies.jwt.keys import FetchError, fetch_json

    async def main() -> Any:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            if raw is None:
                await reader.read()  # never answers; the client's deadline ends it
            else:
                writer.write(raw)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await fetch_json(f"http://127.0.0.1:{port}/jwks", timeout=0.5)
        except FetchError as exc:
            return f"FetchError: {exc}"
        finally:
            server.close()

    result = asyncio.run(main())
    if isinstance(expected, str):
        assert isinstance(result, str) and expected in result, result
    else:
        assert result == expected


# -- config errors ---------------------------------------------------------------------------------------
def _check(tmp_path: Path, routes: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    import yaml

    path = tmp_path / "apigate.yaml"
    path.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "routes": routes}, sort_keys=False))
    return subprocess.run(
        apigate_cmd("check", "-c", str(path)), env=clean_env(), capture_output=True, text=True, timeout=60
    )


def test_config_errors_name_the_field(tmp_path):
    target = "http://127.0.0.1:9"
    result = _check(
        tmp_path,
        [
            _route("/a", target, {"algorithms": ["none"], "secret": HS_SECRET}),
            _route("/b", target, {"issuer": ISSUER}),
            _route("/c", target, {"algorithms": ["HS512"], "secret": "too-short-secret-for-hs512-01234"}),
            _route("/d", target, {"public_key": "-----BEGIN PUBLIC KEY-----\nnot-a-key\n"}),
            _route("/e", target, {"algorithms": ["HS256"], "jwks_url": "http://127.0.0.1:9/jwks.json"}),
        ],
    )
    assert result.returncode == 1, result
    out = result.stderr
    assert "routes[0].policies.jwt.algorithms" in out and "'none' is never accepted" in out
    assert "routes[1].policies.jwt" in out and "no key source" in out
    assert "routes[2].policies.jwt" in out and "at least 64 bytes for HS512" in out
    assert "routes[3].policies.jwt.public_key" in out and "not-a-key" not in out
    assert "routes[4].policies.jwt" in out and "needs a secret" in out
    assert "too-short-secret" not in out


def test_good_config_checks(tmp_path, pem_key):
    key_file = tmp_path / "key.pem"
    key_file.write_text(pem_key.public_pem)
    result = _check(
        tmp_path,
        [
            _route("/a", "http://127.0.0.1:9", {"public_key_file": str(key_file), "algorithms": ["RS256"]}),
            _route("/b", "http://127.0.0.1:9", {"issuer_discovery": "https://login.example.com/realms/x"}),
        ],
    )
    assert result.returncode == 0, result.stderr


# -- runtime revocation by jti (apigate tokens revoke) -------------------------------------------------
def test_check_revoked_needs_the_registry_and_fails_closed_without_it():
    plain = build_policy("jwt", {"algorithms": ["HS256"], "secret": HS_SECRET})
    assert plain.needs == frozenset()
    policy = build_policy("jwt", {"algorithms": ["HS256"], "secret": HS_SECRET, "check_revoked": True})
    assert policy.needs == frozenset({"consumers"})
    reply = _run_without_suspending(policy.on_request(_bearer(hs_sign(claims(jti="j-1")))))
    assert reply.status == 503 and json.loads(reply.body)["reason"] == "revocations_unavailable"
    # Without a jti there is nothing to look up.
    assert _run_without_suspending(policy.on_request(_bearer(hs_sign(claims())))) is None


def test_revoking_a_cached_tokens_jti_through_the_cli_refuses_it_within_a_second(
    start_gateway, shared_upstream, tmp_path
):
    store = f"sqlite:///{tmp_path / 'apigate.db'}"
    hs = {"algorithms": ["HS256"], "secret": HS_SECRET}
    gateway = start_gateway(
        {
            "store": {"url": store},
            "routes": [
                _route("/revocable", shared_upstream.url, {**hs, "check_revoked": True}),
                _route("/static", shared_upstream.url, hs),
            ],
        }
    )
    exp = int(time.time()) + 300
    token, other = hs_sign(claims(jti="leaked-1", exp=exp)), hs_sign(claims(jti="fine-1"))
    for _ in range(2):  # the second call is answered from the verified-token cache
        upstream_view(call(gateway.port, "/revocable/echo", token))

    revoked = apigate_json(
        tmp_path, store, "tokens", "revoke", "leaked-1", "--until", str(exp), "--reason", "leaked"
    )
    assert revoked["jti"] == "leaked-1" and revoked["expires_at"] == exp and revoked["reason"] == "leaked"
    took = seconds_until(lambda: call(gateway.port, "/revocable/echo", token).status == 401)
    assert took <= 1.0, f"the revoked token was refused after {took:.2f}s"
    assert_rejected(call(gateway.port, "/revocable/echo", token), "token_revoked", token)
    upstream_view(call(gateway.port, "/revocable/echo", other))
    upstream_view(call(gateway.port, "/static/echo", token))  # a route that does not check revocations
    listed = apigate_json(tmp_path, store, "tokens", "list")
    assert [(t["jti"], t["expires_at"], t["reason"]) for t in listed] == [("leaked-1", exp, "leaked")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tokens", "revoke", "j", "--until", "1"], "not in the future"),
        (["tokens", "revoke", "j", "--until", "yesterday"], "neither an ISO 8601 time"),
        (["tokens", "revoke", "bad\tjti"], "printable"),
    ],
)
def test_tokens_revoke_refuses_bad_input_in_one_line(tmp_path, args, message):
    done = subprocess.run(
        apigate_cmd(*args, "--store", f"sqlite:///{tmp_path / 'apigate.db'}"),
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert done.returncode == 1 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_expired_revocations_are_purged_after_the_longest_leeway(tmp_path):
    now = [1_000_000.0]
    store = SqliteStore(tmp_path / "apigate.db")
    service = ConsumerService(store, clock=lambda: now[0])

    async def scenario() -> list[list[str]]:
        await store.open()
        try:
            await service.revoke_token("short", until=now[0] + 60)
            await service.revoke_token("forever")
            seen = [[t.jti for t in await service.list_revoked_tokens()]]
            now[0] += 60 + REVOKED_TOKEN_GRACE - 1  # a token may still pass within its leeway
            seen.append([t.jti for t in await service.list_revoked_tokens()])
            now[0] += 2
            seen.append([t.jti for t in await service.list_revoked_tokens()])
            return seen
        finally:
            await store.close()

    assert asyncio.run(scenario()) == [["forever", "short"], ["forever", "short"], ["forever"]]
