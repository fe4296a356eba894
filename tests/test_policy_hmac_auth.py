"""The hmac-auth policy end to end: a real gateway (one worker, so the per-process replay window
is the one every request meets) with config-declared consumers on a SQLite store, in front of a
real upstream; then the replay window on Redis, shared by two gateways, and a Redis outage.
Signatures are computed here with hmac/hashlib, independently of the policy's code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

import pytest
import yaml

from tests.support.errors_helpers import Response, apigate_cmd, clean_env, request, wait_until
from tests.support.gateway import GatewayProcess
from tests.support.proxy_http import find_request, running_gateway, running_upstream
from tests.support.redis import RedisServer
from tests.support.upstream import UpstreamServer

SECRET = "alice-shared-secret-0123456789"
OTHER_SECRET = "bob-shared-secret-abcdefghijkl"
HASHES = {"hmac-sha256": hashlib.sha256, "hmac-sha384": hashlib.sha384, "hmac-sha512": hashlib.sha512}
REASONS_BODY = {"error", "reason", "request_id"}


@dataclass
class Env:
    gateway: GatewayProcess
    upstream: UpstreamServer


def gateway_config(store_url: str, upstream: UpstreamServer) -> dict:
    credentials = {
        "alice": {"secret": SECRET, "consumer": "alice"},
        "bob": {"secret": OTHER_SECRET, "consumer": "bob"},
        "ghost": {"secret": "ghost-secret-0123456789abc", "consumer": "nobody-has-this-id"},
    }
    return {
        "store": {"url": store_url},
        "consumers": [
            {"id": "alice", "tenant": "acme"},
            {"id": "bob"},
        ],
        "routes": [
            {
                "path": "/signed/*",
                "target": upstream.url,
                "policies": {"hmac-auth": {"credentials": credentials}},
            },
            {
                "path": "/body/*",
                "target": upstream.url,
                "policies": {
                    "hmac-auth": {
                        "credentials": credentials,
                        "validate_body": True,
                        "algorithms": ["hmac-sha256", "hmac-sha512"],
                        "enforce_headers": ["date", "request-line", "x-custom"],
                    }
                },
            },
            {
                "path": "/optional/*",
                "target": upstream.url,
                "policies": {"hmac-auth": {"credentials": credentials, "required": False}},
            },
        ],
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    directory = tmp_path_factory.mktemp("hmac_auth")
    url = f"sqlite:///{directory / 'apigate.db'}"
    with (
        running_upstream() as upstream,
        running_gateway(directory / "gw", gateway_config(url, upstream), workers=1) as gateway,
    ):
        yield Env(gateway, upstream)


def http_date(offset: float = 0.0) -> str:
    return formatdate(time.time() + offset, usegmt=True)


_counter = iter(range(1_000_000))


def signed_headers(
    method: str,
    target: str,
    secret: str = SECRET,
    username: str = "alice",
    algorithm: str = "hmac-sha256",
    names: tuple[str, ...] = ("date", "request-line"),
    extra: list[tuple[str, str]] | None = None,
    date: str | None = None,
    body: bytes | None = None,
) -> list[tuple[str, str]]:
    """Headers of a request signed as a client would sign it; each call is a fresh signature."""
    headers = [("Date", date or http_date()), ("X-Nonce", str(next(_counter)))]
    if body is not None:
        headers.append(("Digest", "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode()))
    headers += extra or []
    names = (*names, "x-nonce")  # makes each signature unique, so tests do not replay each other
    lines = []
    for name in names:
        if name == "request-line":
            lines.append(f"{method} {target} HTTP/1.1")
        else:
            values = [v for k, v in headers if k.lower() == name]
            lines.append(f"{name}: {', '.join(values)}")
    digest = hmac.new(secret.encode(), "\n".join(lines).encode(), HASHES[algorithm]).digest()
    signature = base64.b64encode(digest).decode()
    headers.append(
        (
            "Authorization",
            f'hmac username="{username}", algorithm="{algorithm}", headers="{" ".join(names)}", '
            f'signature="{signature}"',
        )
    )
    return headers


def call(env: Env, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"") -> Response:
    return request(env.gateway.port, method, target, headers, body)


def denied(response: Response, reason: str) -> dict:
    assert response.status == 401, response
    payload = response.json()
    assert set(payload) == REASONS_BODY, payload
    assert payload["reason"] == reason, payload
    assert payload["request_id"] == response.header("x-request-id")
    challenge = response.header("www-authenticate") or ""
    assert challenge.startswith('hmac realm="apigate", headers="date request-line'), challenge
    assert "algorithms=" in challenge
    return payload


# -- success -------------------------------------------------------------------------------------------
def test_signed_get_with_query_reaches_upstream_identified(env: Env) -> None:
    target = "/signed/items?b=2&a=1"
    response = call(env, "GET", target, [*signed_headers("GET", target), ("X-Consumer-ID", "forged")])
    assert response.status == 200, response
    seen = find_request(env.upstream, response.header("x-request-id"))
    assert seen.header("x-consumer-id") == "alice"
    assert seen.header("x-tenant-id") == "acme"
    assert seen.header("authorization") is None  # hidden by default
    assert [k for k, _ in seen.headers].count("x-consumer-id") == 1


@pytest.mark.parametrize("algorithm", ["hmac-sha256", "hmac-sha512"])
def test_signed_post_with_digest(env: Env, algorithm: str) -> None:
    body = b'{"order": 42}'
    target = "/body/orders"
    headers = signed_headers(
        "POST",
        target,
        algorithm=algorithm,
        names=("date", "request-line", "digest", "x-custom"),
        extra=[("X-Custom", "yes")],
        body=body,
    )
    response = call(env, "POST", target, headers, body)
    assert response.status == 200, response
    seen = find_request(env.upstream, response.header("x-request-id"))
    assert seen.header("x-consumer-id") == "alice"
    assert seen.body_length == len(body)


def test_body_that_does_not_match_the_signed_digest_is_refused(env: Env) -> None:
    target = "/body/orders"
    signed_for = b'{"order": 42}'
    names = ("date", "request-line", "digest", "x-custom")
    before = len(env.upstream.requests)
    headers = signed_headers("POST", target, names=names, extra=[("X-Custom", "yes")], body=signed_for)
    denied(call(env, "POST", target, headers, b'{"order": 43}'), "invalid_digest")
    # chunked framing does not matter: the digest covers the body's bytes
    headers = signed_headers("POST", target, names=names, extra=[("X-Custom", "yes")], body=signed_for)
    chunked = b"5\r\n" + signed_for[:5] + b"\r\n8\r\n" + signed_for[5:] + b"\r\n0\r\n\r\n"
    response = call(env, "POST", target, [*headers, ("Transfer-Encoding", "chunked")], chunked)
    assert response.status == 200, response
    assert len(env.upstream.requests) == before + 1


@pytest.mark.parametrize(
    "digest", ["MD5=1B2M2Y8AsgTpgAmY7PhCfg==", "SHA-256=not base64!", "SHA-256=" + "A" * 8, "SHA-256"]
)
def test_malformed_digest_header_is_401(env: Env, digest: str) -> None:
    target = "/body/orders"
    headers = signed_headers(
        "POST",
        target,
        names=("date", "request-line", "digest", "x-custom"),
        extra=[("X-Custom", "yes"), ("Digest", digest)],
    )
    denied(call(env, "POST", target, headers, b"{}"), "invalid_digest")


def test_x_date_may_replace_date(env: Env) -> None:
    target = "/signed/x"
    headers = signed_headers("GET", target, names=("x-date", "request-line"), extra=[("X-Date", http_date())])
    headers = [(k, v) for k, v in headers if k != "Date"]
    assert call(env, "GET", target, headers).status == 200


# -- refusals ------------------------------------------------------------------------------------------
def test_missing_signature(env: Env) -> None:
    denied(call(env, "GET", "/signed/x", []), "missing_signature")
    denied(call(env, "GET", "/signed/x", [("Authorization", "Bearer abc")]), "missing_signature")


def test_optional_route_lets_unsigned_requests_through_unidentified(env: Env) -> None:
    response = call(env, "GET", "/optional/x", [("X-Consumer-ID", "forged")])
    assert response.status == 200, response
    seen = find_request(env.upstream, response.header("x-request-id"))
    assert seen.header("x-consumer-id") is None
    bad = signed_headers("GET", "/optional/x", secret="wrong-secret-0123456789abc")
    denied(call(env, "GET", "/optional/x", bad), "invalid_signature")


def test_wrong_secret_unknown_user_and_unknown_consumer_look_the_same(env: Env) -> None:
    target = "/signed/x"
    answers = [
        call(env, "GET", target, signed_headers("GET", target, secret="wrong-secret-0123456789abc")),
        call(env, "GET", target, signed_headers("GET", target, username="mallory")),
        call(
            env,
            "GET",
            target,
            signed_headers("GET", target, username="ghost", secret="ghost-secret-0123456789abc"),
        ),
        call(env, "GET", target, signed_headers("GET", target, secret=OTHER_SECRET)),  # bob's secret as alice
    ]
    bodies = [denied(r, "invalid_signature") for r in answers]
    assert len({b["error"] for b in bodies}) == 1


def test_tampered_path_and_query(env: Env) -> None:
    headers = signed_headers("GET", "/signed/items?id=1")
    denied(call(env, "GET", "/signed/items?id=2", headers), "invalid_signature")
    headers = signed_headers("GET", "/signed/items")
    denied(call(env, "GET", "/signed/admin", headers), "invalid_signature")
    headers = signed_headers("GET", "/signed/items")
    denied(call(env, "DELETE", "/signed/items", headers), "invalid_signature")


def test_tampered_signed_header(env: Env) -> None:
    target = "/body/x"
    body = b"payload"
    headers = signed_headers(
        "POST",
        target,
        names=("date", "request-line", "digest", "x-custom"),
        extra=[("X-Custom", "a")],
        body=body,
    )
    tampered = [(k, "b" if k == "X-Custom" else v) for k, v in headers]
    denied(call(env, "POST", target, tampered, body), "invalid_signature")
    # A signed header removed from the request cannot verify either.
    removed = [(k, v) for k, v in headers if k != "X-Custom"]
    denied(call(env, "POST", target, removed, body), "invalid_signature")


@pytest.mark.parametrize("offset", [-400.0, 400.0])
def test_date_outside_the_clock_skew(env: Env, offset: float) -> None:
    target = "/signed/x"
    denied(call(env, "GET", target, signed_headers("GET", target, date=http_date(offset))), "clock_skew")


def test_missing_or_unparsable_date(env: Env) -> None:
    target = "/signed/x"
    denied(call(env, "GET", target, signed_headers("GET", target, date="yesterday")), "clock_skew")
    headers = [(k, v) for k, v in signed_headers("GET", target) if k != "Date"]
    denied(call(env, "GET", target, headers), "clock_skew")


def test_replay_of_the_same_request_is_refused(env: Env) -> None:
    target = "/signed/once?x=1"
    headers = signed_headers("GET", target)
    assert call(env, "GET", target, headers).status == 200
    denied(call(env, "GET", target, headers), "replayed")


def test_unsigned_required_headers(env: Env) -> None:
    target = "/signed/x"
    denied(call(env, "GET", target, signed_headers("GET", target, names=("date",))), "unsigned_header")
    denied(
        call(env, "GET", target, signed_headers("GET", target, names=("request-line",))), "unsigned_header"
    )
    # validate_body: the digest must be signed; an enforced custom header too.
    body = b"abc"
    no_digest = signed_headers(
        "POST", "/body/x", names=("date", "request-line", "x-custom"), extra=[("X-Custom", "1")]
    )
    denied(call(env, "POST", "/body/x", no_digest, body), "unsigned_header")
    no_custom = signed_headers("POST", "/body/x", names=("date", "request-line", "digest"), body=body)
    denied(call(env, "POST", "/body/x", no_custom, body), "unsigned_header")


def test_unsupported_algorithm(env: Env) -> None:
    target = "/body/x"
    body = b"abc"
    headers = signed_headers(
        "POST",
        target,
        algorithm="hmac-sha384",  # known, but not listed for this route
        names=("date", "request-line", "digest", "x-custom"),
        extra=[("X-Custom", "1")],
        body=body,
    )
    denied(call(env, "POST", target, headers, body), "unsupported_algorithm")
    weird = [
        (k, v.replace('algorithm="hmac-sha256"', 'algorithm="hmac-md5"'))
        for k, v in signed_headers("GET", "/signed/x")
    ]
    denied(call(env, "GET", "/signed/x", weird), "unsupported_algorithm")


@pytest.mark.parametrize(
    "authorization",
    [
        "hmac",
        'hmac username="alice"',
        'hmac signature="AAAA"',
        'hmac username="alice", signature="not base64!!"',
        'hmac username="alice", signature="AAA"',  # bad padding
        'hmac username=alice, signature="AAAA"',
        'hmac username="alice, signature="AAAA"',
        'hmac username="alice" signature="AAAA"',
        'hmac username="alice", signature="AAAA",',
        'hmac username="alice", username="bob", signature="AAAA"',
        'hmac username="al\\"ice", signature="AAAA"',
        'hmac username="alice", , signature="AAAA"',
        "hmac ===",
        'hmac username="' + "a" * 9000 + '", signature="AAAA"',
    ],
)
def test_malformed_authorization_is_401_never_500(env: Env, authorization: str) -> None:
    headers = [("Date", http_date()), ("Authorization", authorization)]
    denied(call(env, "GET", "/signed/x", headers), "malformed_authorization")


def test_non_ascii_authorization_is_401(env: Env) -> None:
    headers = [("Date", http_date()), ("Authorization", 'hmac username="\xe9", signature="AAAA"')]
    response = call(env, "GET", "/signed/x", headers)
    assert response.status == 401, response


# -- configuration ---------------------------------------------------------------------------------------
def test_check_reports_short_secrets_and_unknown_algorithms(tmp_path: Path) -> None:
    routes = [
        {
            "path": "/a/*",
            "target": "http://127.0.0.1:9",
            "policies": {"hmac-auth": {"credentials": {"alice": {"secret": "short", "consumer": "alice"}}}},
        },
        {
            "path": "/b/*",
            "target": "http://127.0.0.1:9",
            "policies": {"hmac-auth": {"algorithms": ["hmac-md5"]}},
        },
    ]
    path = tmp_path / "apigate.yaml"
    path.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", "routes": routes}, sort_keys=False))
    done = subprocess.run(
        apigate_cmd("check", "-c", str(path)), env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "secret must be at least 16 characters" in output, output
    assert "credentials" in output and "alice" in output, output
    assert "algorithms" in output and "hmac-sha256" in output, output
    assert SECRET not in output


# -- the replay window across processes (state backend) -----------------------------------------------
@pytest.mark.parametrize("state", ["memory", "redis"])
def test_replay_window_is_per_process_on_memory_and_cluster_wide_on_redis(
    request: pytest.FixtureRequest, start_gateway, upstream: UpstreamServer, tmp_path: Path, state: str
) -> None:
    config = gateway_config(f"sqlite:///{tmp_path / 'apigate.db'}", upstream)
    if state == "redis":
        config["state"] = {"url": request.getfixturevalue("redis_url")}
    first, second = start_gateway(config), start_gateway(config)
    target = "/signed/pay?amount=10"
    headers = signed_headers("GET", target)
    assert request_to(first, target, headers).status == 200
    denied(request_to(first, target, headers), "replayed")
    replayed_elsewhere = request_to(second, target, headers)
    if state == "memory":
        assert replayed_elsewhere.status == 200  # each process keeps its own window
    else:
        denied(replayed_elsewhere, "replayed")


def test_redis_outage_refuses_signed_requests_with_503_until_it_returns(
    start_gateway, upstream: UpstreamServer, tmp_path: Path
) -> None:
    redis_server = RedisServer(tmp_path / "redis").start()
    try:
        config = gateway_config(f"sqlite:///{tmp_path / 'apigate.db'}", upstream)
        config["state"] = {"url": redis_server.url}
        gateway = start_gateway(config)
        target = "/signed/outage"
        assert request_to(gateway, target, signed_headers("GET", target)).status == 200

        redis_server.stop()
        refused = request_to(gateway, target, signed_headers("GET", target))
        assert refused.status == 503, refused
        assert refused.json()["reason"] == "unavailable"
        assert refused.header("retry-after") == "1"
        # Unsigned traffic on other routes does not depend on Redis.
        assert request_to(gateway, "/optional/x", []).status == 200

        redis_server.start()
        wait_until(lambda: request_to(gateway, target, signed_headers("GET", target)).status == 200)
    finally:
        redis_server.stop()


def request_to(gateway: GatewayProcess, target: str, headers: list[tuple[str, str]]) -> Response:
    return request(gateway.port, "GET", target, headers)
