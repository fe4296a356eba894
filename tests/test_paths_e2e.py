"""End to end: encoded paths never get around a protected route to a public one.

A ``/jwt/*`` route behind key-auth and a public ``/*`` route, each with its own recording
upstream, on a real gateway process. Every attack path is either refused (400) or meets the
protected route (401 without a key); the public upstream never sees a path that decodes to
``/jwt/...``. Run with the default setting (``paths`` not written) and with
``paths.escaped_slashes: unescape``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gateway import GatewayProcess
from tests.support.paths import upstream_decoding
from tests.support.proxy_http import (
    RawConnection,
    RawResponse,
    find_request,
    running_gateway,
    running_upstream,
)
from tests.support.upstream import UpstreamServer

API_KEY = "paths-key-0123456789abcdef"
ATTACKS = [
    "/jwt%2fsecret",
    "/jwt%2Fsecret",
    "/jwt%5csecret",
    "/%6Awt/secret",
    "/%6awt/secret",
    "/x/..%2fjwt/secret",
    "/x/%2e%2e/jwt/secret",
    "/x/.%2E/jwt/secret",
    "/..;/jwt/secret",
    "/x/..;/jwt/secret",
    "/x/..;x=1/jwt/secret",
    "/.;x/jwt/secret",
    "/jwt;x/secret",
    "/jwt/;x/secret",
    "//jwt/secret",
    "/x/..%5cjwt/secret",
]


def gateway_config(tmp: Path, protected: str, public: str, escaped_slashes: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "store": {"url": f"sqlite:///{tmp / 'apigate.db'}"},
        "consumers": [{"id": "alice", "keys": [{"key": API_KEY}]}],
        "routes": [
            {"name": "public", "path": "/*", "target": public},
            {"name": "protected", "path": "/jwt/*", "target": protected, "policies": {"key-auth": {}}},
        ],
    }
    if escaped_slashes != "default":
        config["paths"] = {"escaped_slashes": escaped_slashes}
    return config


def send(gateway: GatewayProcess, path: str, key: str | None = None) -> RawResponse:
    headers = {"X-Request-ID": uuid.uuid4().hex, "Connection": "close"}
    if key is not None:
        headers["X-API-Key"] = key
    with RawConnection(gateway.port) as conn:
        return conn.exchange("GET", path, headers)


def wait_for_key(gateway: GatewayProcess) -> None:
    """Declared consumers are loaded into the store as the gateway starts: poll until the key works."""
    deadline = time.monotonic() + 15
    while send(gateway, "/jwt/ready", API_KEY).status != 200:
        assert time.monotonic() < deadline, "the declared key never started to work"
        time.sleep(0.05)


@pytest.fixture(scope="module", params=["default", "unescape"])
def front_door(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, UpstreamServer, UpstreamServer, str]]:
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"paths-{mode}")
    with running_upstream() as protected, running_upstream() as public:
        config = gateway_config(tmp, protected.url, public.url, mode)
        with running_gateway(tmp / "gw", config) as gateway:
            wait_for_key(gateway)
            yield gateway, protected, public, mode


def test_encoded_paths_never_reach_the_public_route_as_protected_ones(
    front_door: tuple[GatewayProcess, UpstreamServer, UpstreamServer, str],
) -> None:
    gateway, _, public, _ = front_door
    answers = {path: send(gateway, path).status for path in ATTACKS}
    leaked = [seen.path for seen in public.requests if upstream_decoding(seen.path).startswith("/jwt")]
    assert leaked == []
    # Each attack is refused, or meets the protected route's key-auth without a key.
    assert {path: status for path, status in answers.items() if status not in (400, 401)} == {}


def test_the_protected_upstream_gets_the_normal_form(
    front_door: tuple[GatewayProcess, UpstreamServer, UpstreamServer, str],
) -> None:
    gateway, protected, public, mode = front_door
    cases = {
        "/%6Awt/s%65cret": "/jwt/secret",
        "/x/%2E%2e/jwt/a%3fb": "/jwt/a%3Fb",
        "/jwt;v=1/x": "/jwt;v=1/x",  # routed without the parameter, forwarded with it
    }
    if mode == "unescape":
        cases["/x/..%2Fjwt%2fsecret"] = "/jwt/secret"
    for sent, forwarded in cases.items():
        response = send(gateway, sent, API_KEY)
        assert response.status == 200, sent
        assert find_request(protected, response.header("x-request-id") or "").path == forwarded, sent
    response = send(gateway, "/public/x")  # the public route still serves
    assert response.status == 200
    assert find_request(public, response.header("x-request-id") or "").path == "/public/x"


def test_refusals_are_400_naming_the_path(
    front_door: tuple[GatewayProcess, UpstreamServer, UpstreamServer, str],
) -> None:
    gateway, _, _, mode = front_door
    refused = ["/a%00", "/%G1", "/..;/jwt", "/a\\b"] + (["/jwt%2fsecret"] if mode == "default" else [])
    for path in refused:
        response = send(gateway, path, API_KEY)
        assert response.status == 400, path
        assert "request path" in response.body.decode(), path


def test_a_refused_path_behind_a_pipelined_request_is_refused_in_its_turn(
    front_door: tuple[GatewayProcess, UpstreamServer, UpstreamServer, str],
) -> None:
    gateway = front_door[0]
    with RawConnection(gateway.port) as conn:
        conn.send(conn.request("GET", "/delay/100") + conn.request("GET", "/..;/jwt/secret"))
        assert conn.read_response().status == 200
        assert conn.read_response().status == 400
