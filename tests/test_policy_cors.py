"""cors: the CORS protocol of the Fetch standard, answered by a real gateway in front of a real
upstream (preflights, actual requests, origins exact, wildcard and by pattern, Vary, config)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apigate.policies.registry import build_policy
from tests.support.cli import check_problems
from tests.support.gateway import GatewayProcess
from tests.support.policy_config import config_problems, load_route, proxied_route
from tests.support.proxy_http import RawConnection, RawResponse, gateway_before_upstream
from tests.support.upstream import UpstreamServer

APP = "https://app.example.com"
API_KEY = "cors-suite-key-0123456789abcdef"
ASKED_VARY = "Access-Control-Request-Method, Access-Control-Request-Headers"


def cors_route(path: str, upstream: str, cors: dict[str, Any]) -> dict[str, Any]:
    return proxied_route(path, upstream, {"cors": cors})


@dataclass(repr=False)  # Hypothesis prints the fixture: object's short repr, not the configs
class Servers:
    gateway: GatewayProcess
    upstream: UpstreamServer


def suite_config(directory: Path, url: str) -> dict[str, Any]:
    return {
        "store": {"url": f"sqlite:///{directory / 'apigate.db'}"},
        "consumers": [{"id": "cors-tester", "keys": [{"key": API_KEY}]}],
        "routes": [
            cors_route(
                "/exact/*",
                url,
                {
                    "origins": [APP, "http://localhost:3000"],
                    "credentials": True,
                    "methods": ["GET", "POST", "PUT"],
                    "headers": ["X-Api-Key", "Content-Type"],
                    "exposed_headers": ["X-Request-ID", "X-Total"],
                    "max_age": "10m",
                },
            ),
            cors_route("/any/*", url, {"origins": "*", "exposed_headers": ["X-Total"]}),
            cors_route("/wild/*", url, {"origins": ["https://*.example.com"]}),
            cors_route("/regex/*", url, {"origins": ["~https://[a-z]+\\.example\\.org"]}),
            cors_route("/continue/*", url, {"origins": [APP], "preflight_continue": True}),
            proxied_route("/auth/*", url, {"key-auth": {}, "cors": {"origins": [APP], "credentials": True}}),
            # A route that lists its methods, without OPTIONS: browsers still ask first.
            proxied_route("/listed/*", url, {"cors": {"origins": [APP]}}, methods=["GET", "POST"]),
        ],
    }


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    directory = tmp_path_factory.mktemp("cors")
    with gateway_before_upstream(directory / "gw", lambda url: suite_config(directory, url)) as running:
        yield Servers(*running)


def send(servers: Servers, method: str, path: str, headers: dict[str, str] | None = None) -> RawResponse:
    with RawConnection(servers.gateway.port) as conn:
        return conn.exchange(method, path, headers)


def preflight(
    servers: Servers, path: str, origin: str, method: str = "PUT", asked: str | None = None
) -> RawResponse:
    headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if asked is not None:
        headers["Access-Control-Request-Headers"] = asked
    return send(servers, "OPTIONS", path, headers)


def cors_fields(response: RawResponse) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in response.headers:
        if name.startswith("access-control-"):
            found.setdefault(name, []).append(value)
    return found


def vary(response: RawResponse) -> list[str]:
    return response.header_all("vary")


def upstream_methods_since(servers: Servers, before: int) -> list[str]:
    return [seen.method for seen in servers.upstream.requests[before:]]


# -- actual requests ------------------------------------------------------------------------------------
def test_a_simple_get_from_an_allowed_origin_gets_the_allow_fields(servers: Servers) -> None:
    response = send(servers, "GET", "/exact/echo", {"Origin": APP})
    assert response.status == 200
    assert cors_fields(response) == {
        "access-control-allow-origin": [APP],
        "access-control-allow-credentials": ["true"],
        "access-control-expose-headers": ["X-Request-ID, X-Total"],
    }
    assert vary(response) == ["Origin"]
    assert response.json()["headers"]["origin"] == APP  # the upstream still sees the Origin


def test_a_disallowed_origin_gets_no_cors_field_but_is_served(servers: Servers) -> None:
    before = len(servers.upstream.requests)
    for origin in ("https://evil.example", "https://app.example.com.evil.example", "http://app.example.com"):
        response = send(servers, "GET", "/exact/echo", {"Origin": origin})
        assert response.status == 200
        assert cors_fields(response) == {}, origin
        assert vary(response) == ["Origin"]  # the answer depends on the origin: caches must know
    assert upstream_methods_since(servers, before) == ["GET"] * 3


def test_a_request_without_origin_gets_no_cors_field(servers: Servers) -> None:
    response = send(servers, "GET", "/exact/echo")
    assert response.status == 200
    assert cors_fields(response) == {}
    assert vary(response) == ["Origin"]
    assert "origin" not in response.json()["headers"]


def test_any_origin_is_answered_with_a_star_and_no_vary(servers: Servers) -> None:
    for headers in ({"Origin": "https://anyone.example"}, {}):
        response = send(servers, "GET", "/any/echo", headers)
        assert cors_fields(response) == {
            "access-control-allow-origin": ["*"],
            "access-control-expose-headers": ["X-Total"],
        }
        assert vary(response) == []


def test_the_upstreams_cors_fields_are_replaced_and_its_vary_keeps_its_names(servers: Servers) -> None:
    own = (
        "/exact/with-headers?vary=Accept-Encoding&access-control-allow-origin=*"
        "&access-control-allow-methods=DELETE&access-control-allow-credentials=false"
    )
    allowed = send(servers, "GET", own, {"Origin": APP})
    assert cors_fields(allowed) == {
        "access-control-allow-origin": [APP],
        "access-control-allow-credentials": ["true"],
        "access-control-expose-headers": ["X-Request-ID, X-Total"],
    }
    assert vary(allowed) == ["Accept-Encoding, Origin"]
    refused = send(servers, "GET", own, {"Origin": "https://evil.example"})
    assert cors_fields(refused) == {}
    assert vary(refused) == ["Accept-Encoding, Origin"]
    # A Vary that already lists Origin (or is "*") is left as it is.
    assert vary(send(servers, "GET", "/exact/with-headers?vary=origin", {"Origin": APP})) == ["origin"]
    assert vary(send(servers, "GET", "/exact/with-headers?vary=*", {"Origin": APP})) == ["*"]
    two = send(
        servers, "GET", "/exact/with-headers?vary=Accept&vary=Accept-Language,%20Origin", {"Origin": APP}
    )
    assert vary(two) == ["Accept", "Accept-Language, Origin"]


def test_an_error_of_a_later_policy_still_carries_the_cors_fields(servers: Servers) -> None:
    """key-auth's 401 is readable by the page that sent the request (the browser sees why)."""
    response = send(servers, "GET", "/auth/echo", {"Origin": APP})
    assert response.status == 401
    assert cors_fields(response)["access-control-allow-origin"] == [APP]
    served = send(servers, "GET", "/auth/echo", {"Origin": APP, "X-API-Key": API_KEY})
    assert served.status == 200
    assert cors_fields(served)["access-control-allow-credentials"] == ["true"]


def test_a_plain_options_request_goes_to_the_upstream(servers: Servers) -> None:
    before = len(servers.upstream.requests)
    response = send(servers, "OPTIONS", "/exact/echo", {"Origin": APP})
    assert response.status == 200
    assert cors_fields(response)["access-control-allow-origin"] == [APP]
    assert upstream_methods_since(servers, before) == ["OPTIONS"]


# -- preflights ------------------------------------------------------------------------------------------
def test_a_preflight_is_answered_by_the_gateway_and_never_reaches_the_upstream(servers: Servers) -> None:
    before = len(servers.upstream.requests)
    with RawConnection(servers.gateway.port) as conn:
        answer = conn.exchange(
            "OPTIONS",
            "/exact/echo",
            {
                "Origin": APP,
                "Access-Control-Request-Method": "PUT",
                "Access-Control-Request-Headers": "content-type,x-api-key",
            },
        )
        # On the same connection, a request that does reach the upstream: once it is answered,
        # anything sent before it would have been recorded.
        assert conn.exchange("GET", "/exact/echo?after-preflight").status == 200
    assert answer.status == 204
    assert answer.header("content-length") is None and answer.body == b""
    assert cors_fields(answer) == {
        "access-control-allow-origin": [APP],
        "access-control-allow-methods": ["GET, POST, PUT"],
        "access-control-allow-headers": ["X-Api-Key, Content-Type"],
        "access-control-allow-credentials": ["true"],
        "access-control-max-age": ["600"],
    }
    assert vary(answer) == ["Origin, " + ASKED_VARY]
    assert upstream_methods_since(servers, before) == ["GET"]


def test_a_preflight_without_credentials_echoes_the_headers_it_asks_for(servers: Servers) -> None:
    answer = preflight(servers, "/any/echo", "https://anyone.example", "DELETE", "X-Custom, content-type")
    assert answer.status == 204
    assert cors_fields(answer) == {
        "access-control-allow-origin": ["*"],
        "access-control-allow-methods": ["GET, HEAD, PUT, PATCH, POST, DELETE"],
        "access-control-allow-headers": ["x-custom, content-type"],
    }
    assert vary(answer) == [ASKED_VARY]
    nothing_asked = preflight(servers, "/any/echo", "https://anyone.example", "GET")
    assert "access-control-allow-headers" not in cors_fields(nothing_asked)


def test_a_preflight_asking_for_a_header_not_allowed_is_refused(servers: Servers) -> None:
    allowed = preflight(servers, "/exact/echo", APP, "POST", "x-api-key")
    assert cors_fields(allowed)["access-control-allow-origin"] == [APP]
    for asked in ("x-api-key, x-other", "authorization", "x-api-key, bad header"):
        refused = preflight(servers, "/exact/echo", APP, "POST", asked)
        assert refused.status == 204
        assert cors_fields(refused) == {}, asked
        assert vary(refused) == ["Origin, " + ASKED_VARY]


def test_a_preflight_for_a_method_not_allowed_is_refused(servers: Servers) -> None:
    assert cors_fields(preflight(servers, "/exact/echo", APP, "DELETE")) == {}
    assert cors_fields(preflight(servers, "/exact/echo", APP, "put")) == {}  # methods are case-sensitive
    # GET, HEAD and POST are CORS-safelisted: a browser may ask, and is never refused them.
    assert cors_fields(preflight(servers, "/exact/echo", APP, "HEAD"))["access-control-allow-origin"] == [APP]


def test_a_preflight_from_a_disallowed_origin_gets_no_cors_field(servers: Servers) -> None:
    before = len(servers.upstream.requests)
    answer = preflight(servers, "/exact/echo", "https://evil.example", "PUT", "x-api-key")
    assert answer.status == 204
    assert cors_fields(answer) == {}
    assert answer.body == b""  # no error page that would describe what is allowed
    assert send(servers, "GET", "/exact/echo").status == 200
    assert upstream_methods_since(servers, before) == ["GET"]


def test_a_preflight_needs_no_credentials_where_auth_follows(servers: Servers) -> None:
    answer = preflight(servers, "/auth/echo", APP, "PUT", "x-api-key")
    assert answer.status == 204
    assert cors_fields(answer)["access-control-allow-origin"] == [APP]


def test_preflight_continue_lets_the_upstream_answer_preflights(servers: Servers) -> None:
    before = len(servers.upstream.requests)
    answer = preflight(servers, "/continue/echo", APP, "PUT")
    assert answer.status == 200
    assert cors_fields(answer) == {}  # the upstream's answer, as it is
    assert upstream_methods_since(servers, before) == ["OPTIONS"]
    actual = send(servers, "GET", "/continue/echo", {"Origin": APP})
    assert cors_fields(actual) == {"access-control-allow-origin": [APP]}


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://api.example.com", True),
        ("https://a.b.example.com", True),
        ("https://example.com", False),
        ("http://api.example.com", False),
        ("https://api.example.com:8443", False),
        ("https://api.example.com.evil.net", False),
        ("https://evil.net/.example.com", False),
        ("https://-x.example.com", False),
    ],
)
def test_a_wildcard_origin_allows_its_subdomains_only(servers: Servers, origin: str, allowed: bool) -> None:
    actual = send(servers, "GET", "/wild/echo", {"Origin": origin})
    assert cors_fields(actual).get("access-control-allow-origin") == ([origin] if allowed else None)
    answer = preflight(servers, "/wild/echo", origin, "PATCH")
    assert cors_fields(answer).get("access-control-allow-origin") == ([origin] if allowed else None)


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://shop.example.org", True),
        ("https://shop1.example.org", False),
        ("https://shop.example.org.evil.net", False),  # the pattern matches the whole origin
        ("http://shop.example.org", False),
    ],
)
def test_a_pattern_origin_must_match_the_whole_origin(servers: Servers, origin: str, allowed: bool) -> None:
    actual = send(servers, "GET", "/regex/echo", {"Origin": origin})
    assert cors_fields(actual).get("access-control-allow-origin") == ([origin] if allowed else None)
    answer = preflight(servers, "/regex/echo", origin)
    assert cors_fields(answer).get("access-control-allow-origin") == ([origin] if allowed else None)


ALLOWED_BY_PATH = {
    "/exact/echo": re.compile(re.escape(APP)),
    "/wild/echo": re.compile(r"https://([a-z0-9-]+\.)+example\.com"),
    "/regex/echo": re.compile(r"https://[a-z]+\.example\.org"),
}
# Header values a client can send: any byte but CR and LF (those end the line), as latin-1.
HEADER_TEXT = st.text(
    st.characters(min_codepoint=1, max_codepoint=255, exclude_characters="\r\n"), max_size=80
)


@settings(max_examples=80, derandomize=True, deadline=None)
@given(
    method=st.sampled_from(["GET", "OPTIONS", "POST"]),
    origin=st.one_of(
        st.none(), HEADER_TEXT, st.sampled_from([APP, "null", APP + " ", "https://*.example.com"])
    ),
    asked_method=st.one_of(st.none(), HEADER_TEXT, st.sampled_from(["PUT", "put", ""])),
    asked_headers=st.one_of(st.none(), HEADER_TEXT, st.sampled_from(["x-api-key", ",,", "x-api-key,,"])),
    path=st.sampled_from(["/exact/echo", "/any/echo", "/wild/echo", "/regex/echo"]),
)
def test_arbitrary_origin_and_request_fields_never_break_the_exchange(
    servers: Servers,
    method: str,
    origin: str | None,
    asked_method: str | None,
    asked_headers: str | None,
    path: str,
) -> None:
    headers = {}
    if origin is not None:
        headers["Origin"] = origin
    if asked_method is not None:
        headers["Access-Control-Request-Method"] = asked_method
    if asked_headers is not None:
        headers["Access-Control-Request-Headers"] = asked_headers
    with RawConnection(servers.gateway.port, timeout=5) as conn:
        conn.send(conn.request(method, path, headers))
        response = conn.read_response(method)
    assert response.status < 500, response
    granted = cors_fields(response).get("access-control-allow-origin")
    if granted is not None:
        # Only ever "*" where every origin is allowed, else one allowed origin, once.
        assert len(granted) == 1, response
        if path == "/any/echo":
            assert granted == ["*"], response
        else:
            assert ALLOWED_BY_PATH[path].fullmatch(granted[0]), response


# -- config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cors", "field", "says"),
    [
        ({"origins": ["https://app.example.com/"]}, "origins[0]", "without a path"),
        ({"origins": [APP, "app.example.com"]}, "origins[1]", "is not an origin"),
        ({"origins": ["https://*.com"]}, "origins[0]", "top-level domain"),
        ({"origins": ["https://a.*.example.com"]}, "origins[0]", "first labels"),
        ({"origins": ["https://app.example.com:99999"]}, "origins[0]", "invalid port"),
        ({"origins": ["null"]}, "origins[0]", "cannot be allowed"),
        ({"origins": ["~https://(unclosed"]}, "origins[0]", "does not compile"),
        ({"origins": ["*", APP]}, "origins", "list it alone"),
        ({"origins": []}, "origins", "at least 1"),
        ({}, "origins", "required"),
        ({"origins": "*", "credentials": True}, "credentials", "Access-Control-Allow-Origin: *"),
        (
            {"origins": [APP], "credentials": True, "exposed_headers": ["*"]},
            "exposed_headers",
            "without credentials",
        ),
        ({"origins": [APP], "max_age": -5}, "max_age", "negative"),
        ({"origins": [APP], "methods": ["GET", "FETCH"]}, "methods", "FETCH"),
        ({"origins": [APP], "headers": ["X Bad"]}, "headers", "not a valid header name"),
        ({"origins": [APP], "headers": ["*"]}, "headers", "leave headers unset"),
        ({"origins": [APP], "allow_origin": True}, "allow_origin", "Extra inputs"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_field(cors: dict[str, Any], field: str, says: str) -> None:
    message = config_problems("cors", cors)
    assert f"routes[0].policies.cors.{field}: " in message, message
    assert says in message, message


def test_origins_are_kept_as_browsers_send_them() -> None:
    """Lowercase scheme and host, no default port: the form a browser's Origin has."""
    origins = [
        "HTTPS://App.Example.com:443",
        "http://[0::1]:80",
        "https://*.Example.com:8443",
        "http://h:8080",
    ]
    load_route("cors", {"origins": origins})
    policy = build_policy("cors", {"origins": origins})
    assert policy.config.origins == [
        "https://app.example.com",
        "http://[::1]",
        "https://*.example.com:8443",
        "http://h:8080",
    ]
    assert policy.matcher.allows(b"https://app.example.com")
    assert policy.matcher.allows(b"https://a.example.com:8443")
    assert not policy.matcher.allows(b"https://a.example.com")


def test_apigate_check_names_the_field_and_line(tmp_path: Path) -> None:
    problems = check_problems(
        tmp_path,
        "routes:\n"
        "  - path: /x\n"
        "    target: http://127.0.0.1:9\n"
        "    policies:\n"
        "      cors:\n"
        "        origins: ['https://app.example.com', '~[a-z']\n"
        "        credentials: true\n"
        "        max_age: -1\n",
    )
    assert "line 6: routes[0].policies.cors.origins[1]: " in problems, problems
    assert "line 8: routes[0].policies.cors.max_age: " in problems, problems


# -- a route that lists its methods without OPTIONS -------------------------------------------------
def test_a_route_listing_methods_without_options_still_answers_preflights(servers: Servers) -> None:
    before = len(servers.upstream.requests)
    response = preflight(servers, "/listed/echo", APP, method="POST", asked="Content-Type")
    assert response.status == 204
    assert cors_fields(response)["access-control-allow-origin"] == [APP]
    assert cors_fields(response)["access-control-allow-headers"] == ["content-type"]
    assert send(servers, "POST", "/listed/echo", {"Origin": APP}).status == 200
    assert upstream_methods_since(servers, before) == ["POST"]  # the preflight never went upstream


def test_on_such_a_route_other_options_requests_are_405_at_the_gateway(servers: Servers) -> None:
    before = len(servers.upstream.requests)
    for headers in ({}, {"Origin": APP}, {"Access-Control-Request-Method": "POST"}):
        response = send(servers, "OPTIONS", "/listed/echo", headers)
        assert response.status == 405, headers
        assert response.header("allow") == "GET, POST"
        assert response.json()["error"] == "method not allowed"
        assert cors_fields(response).keys() <= {"access-control-allow-origin"}
    deleted = send(servers, "DELETE", "/listed/echo", {"Origin": APP})
    assert deleted.status == 405  # the router's: methods the route does not list stay refused
    assert upstream_methods_since(servers, before) == []
