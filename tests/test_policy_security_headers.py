"""security-headers: the browser security fields on every response of a route, upstream's and
gateway's own, through a real gateway in front of a real upstream."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apigate.policies.registry import build_policy
from tests.support.cli import check_problems
from tests.support.gateway import GatewayProcess, free_port
from tests.support.policy_config import config_problems, load_route
from tests.support.policy_config import proxied_route as route
from tests.support.proxy_http import RawConnection, RawResponse, gateway_before_upstream

FIELDS = (
    "strict-transport-security",
    "x-content-type-options",
    "x-frame-options",
    "referrer-policy",
    "content-security-policy",
    "permissions-policy",
)
DEFAULTS = {
    "x-content-type-options": ["nosniff"],
    "x-frame-options": ["DENY"],
    "referrer-policy": ["same-origin"],
}
CSP = "default-src 'none'; frame-ancestors 'none'"
PERMISSIONS = "geolocation=(), camera=()"


def suite_config(directory: Path, url: str) -> dict[str, Any]:
    return {
        "store": {"url": f"sqlite:///{directory / 'apigate.db'}"},
        "policies": {"security-headers": {}},  # every route, unless it sets its own
        "routes": [
            route("/defaults/*", url, {}),
            route(
                "/full/*",
                url,
                {
                    "security-headers": {
                        "hsts": {"max_age": "730d", "include_subdomains": True, "preload": True},
                        "x_frame_options": "sameorigin",
                        "referrer_policy": "no-referrer, strict-origin-when-cross-origin",
                        "content_security_policy": CSP,
                        "permissions_policy": PERMISSIONS,
                    }
                },
            ),
            route("/hsts/*", url, {"security-headers": {"hsts": True}}),
            route("/override/*", url, {"security-headers": {"override": True}}),
            route(
                "/off/*",
                url,
                {
                    "security-headers": {
                        "x_content_type_options": False,
                        "x_frame_options": None,
                        "referrer_policy": False,
                    }
                },
            ),
            route("/edited/*", url, {"headers": {"response": {"set": {"X-Frame-Options": "SAMEORIGIN"}}}}),
            route("/auth/*", url, {"key-auth": {}}),
            route("/down/*", f"http://127.0.0.1:{free_port()}", {}, retries=0),
        ],
    }


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    directory = tmp_path_factory.mktemp("security-headers")
    with gateway_before_upstream(directory / "gw", lambda url: suite_config(directory, url)) as (gateway, _):
        yield gateway


def get(gateway: GatewayProcess, path: str) -> RawResponse:
    with RawConnection(gateway.port) as conn:
        return conn.exchange("GET", path)


def security_fields(response: RawResponse) -> dict[str, list[str]]:
    return {name: response.header_all(name) for name in FIELDS if response.header_all(name)}


def test_the_defaults_are_those_of_the_pactown_settings(gateway: GatewayProcess) -> None:
    response = get(gateway, "/defaults/echo")
    assert response.status == 200
    assert security_fields(response) == DEFAULTS


def test_every_field_can_be_set(gateway: GatewayProcess) -> None:
    assert security_fields(get(gateway, "/full/echo")) == {
        "strict-transport-security": ["max-age=63072000; includeSubDomains; preload"],
        "x-content-type-options": ["nosniff"],
        "x-frame-options": ["SAMEORIGIN"],
        "referrer-policy": ["no-referrer, strict-origin-when-cross-origin"],
        "content-security-policy": [CSP],
        "permissions-policy": [PERMISSIONS],
    }
    hsts = security_fields(get(gateway, "/hsts/echo"))["strict-transport-security"]
    assert hsts == ["max-age=31536000"]


def test_fields_turned_off_are_left_out(gateway: GatewayProcess) -> None:
    assert security_fields(get(gateway, "/off/echo")) == {}


def test_the_upstreams_own_values_are_kept_unless_override(gateway: GatewayProcess) -> None:
    own = "/with-headers?x-frame-options=SAMEORIGIN&referrer-policy=no-referrer"
    kept = security_fields(get(gateway, "/defaults" + own))
    assert kept == {
        "x-content-type-options": ["nosniff"],
        "x-frame-options": ["SAMEORIGIN"],
        "referrer-policy": ["no-referrer"],
    }
    replaced = security_fields(get(gateway, "/override" + own))
    assert replaced == DEFAULTS
    # Fields the policy does not set pass as the upstream sent them.
    csp = get(gateway, "/override/with-headers?content-security-policy=default-src%20'self'")
    assert security_fields(csp)["content-security-policy"] == ["default-src 'self'"]


def test_a_routes_headers_edit_wins(gateway: GatewayProcess) -> None:
    """`headers` runs after security-headers on the response: what a route sets explicitly stays."""
    assert security_fields(get(gateway, "/edited/echo"))["x-frame-options"] == ["SAMEORIGIN"]


@pytest.mark.parametrize(("path", "status"), [("/auth/echo", 401), ("/down/echo", 502)])
def test_the_gateways_own_answers_carry_them(gateway: GatewayProcess, path: str, status: int) -> None:
    response = get(gateway, path)
    assert response.status == status
    assert security_fields(response) == DEFAULTS


# -- config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "field", "says"),
    [
        (
            {"content_security_policy": "default-src 'self'\r\nX-Injected: 1"},
            "content_security_policy",
            "CR, LF",
        ),
        ({"permissions_policy": "camera=(),\ngeolocation=()"}, "permissions_policy", "CR, LF"),
        ({"content_security_policy": "  "}, "content_security_policy", "cannot be empty"),
        ({"x_frame_options": "ALLOW-FROM https://a.example"}, "x_frame_options", "obsolete"),
        ({"x_frame_options": "ALLOWALL"}, "x_frame_options", "DENY"),
        ({"referrer_policy": "same-origin, sometimes"}, "referrer_policy", "'sometimes'"),
        ({"hsts": {"max_age": -1}}, "hsts.max_age", "negative"),
        (
            {"hsts": {"preload": True, "include_subdomains": True, "max_age": "30d"}},
            "hsts",
            "at least a year",
        ),
        ({"hsts": {"preload": True}}, "hsts", "include_subdomains"),
        ({"x_xss_protection": "1; mode=block"}, "x_xss_protection", "Extra inputs"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_field(
    settings: dict[str, Any], field: str, says: str
) -> None:
    message = config_problems("security-headers", settings)
    assert f"routes[0].policies.security-headers.{field}: " in message, message
    assert says in message, message


def test_a_policy_with_every_field_off_has_no_hook() -> None:
    off = {
        "x_content_type_options": False,
        "x_frame_options": False,
        "referrer_policy": None,
    }
    load_route("security-headers", off)
    assert build_policy("security-headers", off).phases == frozenset()
    assert build_policy("security-headers", {}).phases == frozenset({"response"})


def test_apigate_check_names_the_field_and_line(tmp_path: Path) -> None:
    problems = check_problems(
        tmp_path,
        "policies:\n"
        "  security-headers:\n"
        "    hsts: {max_age: 1d, preload: true}\n"
        "    referrer_policy: everywhere\n"
        "routes:\n"
        "  - path: /x\n"
        "    target: http://127.0.0.1:9\n",
    )
    assert "line 3: policies.security-headers.hsts: " in problems, problems
    assert "line 4: policies.security-headers.referrer_policy: " in problems, problems
