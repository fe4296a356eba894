"""The basic-auth policy: end to end through a real gateway (2 workers, SQLite store) in front of a
real upstream, plus unit tests of the policy object for what a socket cannot show (the cache)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from apigate.config.models import ConsumerConfig
from apigate.consumers import passwords
from apigate.consumers.passwords import hash_password, parse_hash, verify_password
from apigate.consumers.registry import Login
from apigate.engine.replies import Reply
from apigate.policies.registry import build_policy, validate_policy_config
from apigate.store.roles.consumers import Consumer
from tests.support.errors_helpers import Response, request, wait_until
from tests.support.gateway import GatewayProcess
from tests.support.proxy_http import find_request, running_gateway, running_upstream
from tests.support.upstream import UpstreamServer

CHALLENGE = 'Basic realm="apigate", charset="UTF-8"'
PASSWORDS = {"alice": "correct horse battery staple", "bob": "pässwörd:with:colons"}


@dataclass
class Env:
    gateway: GatewayProcess
    upstream: UpstreamServer


def gateway_config(store_url: str, upstream: UpstreamServer) -> dict:
    target = upstream.url
    return {
        "store": {"url": store_url},
        "consumers": [
            {
                "id": "alice",
                "tenant": "acme",
                "groups": ["staff"],
                "password_hash": hash_password(PASSWORDS["alice"]),
            },
            {"id": "bob", "password_hash": hash_password(PASSWORDS["bob"])},
            {"id": "nopass", "tenant": "acme"},
        ],
        "routes": [
            {"path": "/basic/*", "target": target, "policies": {"basic-auth": {}}},
            {
                "path": "/visible/*",
                "target": target,
                "policies": {
                    "basic-auth": {
                        "hide_credentials": False,
                        "forward_headers": {"tenant": None, "groups": "X-Consumer-Groups"},
                    }
                },
            },
            {"path": "/optional/*", "target": target, "policies": {"basic-auth": {"required": False}}},
        ],
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    directory = tmp_path_factory.mktemp("basic_auth")
    url = f"sqlite:///{directory / 'apigate.db'}"
    with (
        running_upstream() as upstream,
        running_gateway(directory / "gw", gateway_config(url, upstream), workers=2) as gateway,
    ):
        yield Env(gateway, upstream)


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def call(
    env: Env, path: str = "/basic/echo", authorization: str | None = None, headers: list | None = None
) -> Response:
    pairs = list(headers or [])
    if authorization is not None:
        pairs.append(("Authorization", authorization))
    return request(env.gateway.port, "GET", path, pairs)


def denied(response: Response, reason: str) -> dict:
    assert response.status == 401, response
    assert response.header("www-authenticate") == CHALLENGE
    data = response.json()
    assert data["request_id"] == response.header("x-request-id")
    assert data["reason"] == reason
    assert set(data) == {"error", "reason", "request_id"}
    return {k: v for k, v in data.items() if k != "request_id"}


# -- end to end -------------------------------------------------------------------------------------------
def test_correct_credentials_reach_upstream_with_consumer_headers_and_no_authorization(env: Env) -> None:
    spoof = [("X-Consumer-ID", "admin"), ("X-Tenant-ID", "other")]
    response = call(env, authorization=basic("alice", PASSWORDS["alice"]), headers=spoof)
    assert response.status == 200, response
    seen = find_request(env.upstream, response.header("x-request-id"))
    names = [name for name, _ in seen.headers]
    assert "authorization" not in names
    assert [v for k, v in seen.headers if k == "x-consumer-id"] == ["alice"]
    assert [v for k, v in seen.headers if k == "x-tenant-id"] == ["acme"]


def test_password_with_colons_and_non_ascii(env: Env) -> None:
    response = call(env, authorization=basic("bob", PASSWORDS["bob"]))
    assert response.status == 200, response
    seen = find_request(env.upstream, response.header("x-request-id"))
    assert seen.header("x-consumer-id") == "bob"
    assert seen.header("x-tenant-id") is None


def test_visible_credentials_and_custom_forwarding(env: Env) -> None:
    auth = basic("alice", PASSWORDS["alice"])
    response = call(env, "/visible/x", authorization=auth)
    assert response.status == 200, response
    seen = find_request(env.upstream, response.header("x-request-id"))
    assert seen.header("authorization") == auth
    assert seen.header("x-consumer-groups") == "staff"
    assert seen.header("x-tenant-id") is None


def test_wrong_password_and_unknown_user_get_the_same_answer(env: Env) -> None:
    wrong = denied(call(env, authorization=basic("alice", "nope")), "invalid_credentials")
    unknown = denied(call(env, authorization=basic("mallory", "nope")), "invalid_credentials")
    no_password = denied(call(env, authorization=basic("nopass", "")), "invalid_credentials")
    assert wrong == unknown == no_password


def test_missing_credentials(env: Env) -> None:
    denied(call(env), "missing_credentials")
    denied(call(env, authorization="Bearer abc.def.ghi"), "missing_credentials")


@pytest.mark.parametrize(
    "value",
    [
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"no-colon-here").decode(),
        "Basic " + base64.b64encode(b"alice:\xff\xfe").decode(),
        "Basic " + base64.b64encode(b"\xc3(:x").decode(),
        "Basic " + base64.b64encode(b"alice:" + b"x" * 6000).decode(),
        "Basic",
        "basic " + base64.b64encode(b"a:b").decode()[:-1],
    ],
    ids=["not-base64", "no-colon", "non-utf8-password", "non-utf8-user", "huge", "empty", "bad-padding"],
)
def test_malformed_authorization_is_401_never_500(env: Env, value: str) -> None:
    denied(call(env, authorization=value), "malformed_authorization")


def test_optional_route(env: Env) -> None:
    response = call(env, "/optional/x", headers=[("X-Consumer-ID", "admin")])
    assert response.status == 200, response
    seen = find_request(env.upstream, response.header("x-request-id"))
    assert seen.header("x-consumer-id") is None  # the client's copy is removed
    denied(call(env, "/optional/x", authorization=basic("alice", "nope")), "invalid_credentials")
    response = call(env, "/optional/x", authorization=basic("alice", PASSWORDS["alice"]))
    assert response.status == 200


def test_logins_stored_with_the_cli_are_accepted(env: Env) -> None:
    store = f"sqlite:///{env.gateway.config_path.parent.parent / 'apigate.db'}"
    cwd = env.gateway.config_path.parent
    created = apigate(cwd, "consumers", "create", "carol", "--tenant", "acme", "--store", store)
    assert created.returncode == 0, created.stderr
    auth = basic("carol.login", "a stored password")
    denied(call(env, authorization=auth), "invalid_credentials")
    command = ("consumers", "set-password", "carol", "carol.login", "--store", store)
    done = apigate(cwd, *command, stdin="a stored password\n")
    assert done.returncode == 0, done.stderr
    assert "a stored password" not in done.stdout + done.stderr
    # Every worker picks the login up from the store within its poll interval.
    wait_until(lambda: all(call(env, authorization=auth).status == 200 for _ in range(4)))
    response = call(env, authorization=auth)
    seen = find_request(env.upstream, response.header("x-request-id"))
    assert seen.header("x-consumer-id") == "carol"
    assert seen.header("x-tenant-id") == "acme"
    denied(call(env, authorization=basic("carol.login", "wrong password")), "invalid_credentials")
    denied(call(env, authorization=basic("carol", "a stored password")), "invalid_credentials")


def test_repeated_credentials_keep_working(env: Env) -> None:
    auth = basic("alice", PASSWORDS["alice"])
    assert all(call(env, authorization=auth).status == 200 for _ in range(6))


# -- CLI and config ------------------------------------------------------------------------------------------
def apigate(cwd: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apigate", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hash_password_command_output_verifies(tmp_path: Path) -> None:
    done = apigate(tmp_path, "hash-password", stdin="s3cret pass\n")
    assert done.returncode == 0, done.stderr
    encoded = done.stdout.strip()
    assert encoded.startswith("scrypt$16384$8$1$")
    assert verify_password("s3cret pass", encoded)
    assert not verify_password("s3cret pass\n", encoded)
    assert not verify_password("other", encoded)
    assert apigate(tmp_path, "hash-password", stdin="").returncode == 1


def test_check_rejects_a_malformed_password_hash(tmp_path: Path) -> None:
    good = hash_password("pw")
    (tmp_path / "bad.yaml").write_text(
        "consumers:\n"
        "  - id: alice\n"
        "    password_hash: plain-text-password\n"
        "  - id: bob\n"
        f"    password_hash: '{good.replace('$16384$', '$1000$')}'\n"
        "  - id: carol\n"
        f"    password_hash: '{good}'\n"
        "routes:\n"
        "  - path: /a\n"
        "    target: http://127.0.0.1:9001\n"
        "    policies: {basic-auth: {}}\n"
    )
    done = apigate(tmp_path, "check", "-c", "bad.yaml")
    assert done.returncode == 1
    assert "bad.yaml: 2 problems" in done.stderr, done.stderr
    assert "consumers[0].password_hash" in done.stderr
    assert "consumers[1].password_hash" in done.stderr
    assert "power of 2" in done.stderr


@pytest.mark.parametrize(
    "text",
    ["", "bcrypt$1$2$3$4$5", "scrypt$16384$8$1$!!$AAAA", "scrypt$16384$0$1$AAAAAAAAAAA=$" + "A" * 44],
)
def test_parse_hash_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hash(text)


def test_policy_config_validation() -> None:
    assert validate_policy_config("basic-auth", {"realm": 'a"b'}, ("p",))
    assert validate_policy_config("basic-auth", {"forward_headers": {"key_id": "X-Key"}}, ("p",))
    assert validate_policy_config("basic-auth", {"forward_headers": {"tenant": "Authorization"}}, ("p",))
    assert validate_policy_config("basic-auth", {"cache_ttl": -1}, ("p",))
    assert not validate_policy_config("basic-auth", {"cache_ttl": 0, "required": False}, ("p",))


# -- the policy object: the cache -------------------------------------------------------------------------
class FakeRegistry:
    def __init__(self, consumers: list[ConsumerConfig]) -> None:
        self.config = SimpleNamespace(consumers=consumers)
        self.version = 1

    def consumer(self, consumer_id: str) -> Consumer | None:
        for item in self.config.consumers:
            if item.id == consumer_id:
                return Consumer(id=item.id, tenant=item.tenant, groups=tuple(item.groups))
        return None

    def login(self, username: str) -> Login | None:
        """As the registry answers for config consumers (stored logins: see the end-to-end test)."""
        for item in self.config.consumers:
            if item.id == username and item.password_hash is not None:
                return Login(item.id, parse_hash(item.password_hash), frozenset())
        return None


def fake_exchange(authorization: str | None) -> Any:
    headers = [(b"host", b"x")]
    if authorization is not None:
        headers.append((b"authorization", authorization.encode()))
    return SimpleNamespace(headers=headers, request_id="r1", consumer=None, tenant=None)


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    calls: list[bytes] = []
    real = hashlib.scrypt

    def counting(password: bytes, **kwargs: Any) -> bytes:
        calls.append(password)
        return real(password, **kwargs)

    monkeypatch.setattr(passwords.hashlib, "scrypt", counting)
    return calls


def run(policy: Any, exchange: Any) -> tuple[bool, Reply | None]:
    """(whether the hook had to wait, its result)."""
    result = policy.on_request(exchange)
    if result is None or isinstance(result, Reply):
        return False, result
    return True, asyncio.run(result)


def make_policy(config: dict | None = None, **hashes: str) -> tuple[Any, FakeRegistry]:
    registry = FakeRegistry(
        [ConsumerConfig(id=name, tenant="t", password_hash=h) for name, h in hashes.items()]
    )
    policy = build_policy("basic-auth", config or {}, SimpleNamespace(consumers=registry))
    return policy, registry


def test_a_verified_credential_is_cached(scrypt_calls: list[bytes]) -> None:
    policy, registry = make_policy(alice=hash_password("pw"))
    scrypt_calls.clear()
    waited, result = run(policy, first := fake_exchange(basic("alice", "pw")))
    assert (waited, result) == (True, None)
    assert first.consumer.id == "alice"
    assert (b"x-consumer-id", b"alice") in first.headers
    assert all(name != b"authorization" for name, _ in first.headers)
    assert len(scrypt_calls) == 1
    for _ in range(5):  # inline from the cache: no awaitable, no scrypt
        again = fake_exchange(basic("alice", "pw"))
        assert run(policy, again) == (False, None)
        assert again.consumer.id == "alice"
    assert len(scrypt_calls) == 1
    # A wrong password is never served from the cache, and failures are not cached.
    for _ in range(2):
        waited, result = run(policy, fake_exchange(basic("alice", "pW")))
        assert waited and isinstance(result, Reply) and result.status == 401
    assert len(scrypt_calls) == 3
    # A registry change empties the cache.
    registry.version = 2
    assert run(policy, fake_exchange(basic("alice", "pw"))) == (True, None)
    assert len(scrypt_calls) == 4


def test_unknown_users_cost_a_verification_too(scrypt_calls: list[bytes]) -> None:
    policy, _ = make_policy(alice=hash_password("pw"))
    run(policy, fake_exchange(basic("nobody", "warm-up")))  # the dummy hash is made once
    scrypt_calls.clear()
    waited, result = run(policy, fake_exchange(basic("nobody", "pw")))
    assert waited and isinstance(result, Reply) and result.status == 401
    assert scrypt_calls == [b"pw"]


def test_cache_off_and_bounded(scrypt_calls: list[bytes]) -> None:
    cheap = hash_password("pw", n=2**10, r=1)
    policy, _ = make_policy({"cache_ttl": 0}, alice=cheap)
    for _ in range(3):
        assert run(policy, fake_exchange(basic("alice", "pw"))) == (True, None)
    bounded, _ = make_policy({"cache_size": 2}, a=cheap, b=cheap, c=cheap)
    for name in ("a", "b", "c"):
        assert run(bounded, fake_exchange(basic(name, "pw"))) == (True, None)
    assert len(bounded._cache) == 2
    assert run(bounded, fake_exchange(basic("c", "pw"))) == (False, None)
    assert run(bounded, fake_exchange(basic("a", "pw"))) == (True, None)  # the oldest went


def test_password_checks_in_flight_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the bound a check is refused at once (callers answer 503), never queued without end."""
    monkeypatch.setattr(passwords, "MAX_PENDING_CHECKS", 3)
    stored = parse_hash(hash_password("pw"))

    async def flood() -> list[object]:
        checks = [passwords.check_password_off_loop(stored, b"pw") for _ in range(5)]
        return await asyncio.gather(*checks, return_exceptions=True)

    results = asyncio.run(flood())
    assert results[:3] == [True, True, True]
    assert all(isinstance(r, passwords.PasswordChecksBusy) for r in results[3:])
    assert asyncio.run(passwords.check_password_off_loop(stored, b"pw")) is True  # the count went back down
