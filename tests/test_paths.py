"""Request path normalisation: the route the gateway matches is the route the upstream's decoding
would match, or the request is refused.

Unit tables for engine/paths.py, the router's handling of ``;`` path parameters, the config
option and route-path check, and a differential property test against a reference decoder
written the way servlet containers decode (tests/support/paths.py). The end-to-end regression on
a real gateway process is tests/test_paths_e2e.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from apigate.config.models import GatewayConfig, RouteConfig
from apigate.engine.client import split_target
from apigate.engine.paths import PathRefused, normalize_path
from apigate.engine.router import RouteEntry, RouteMatch, Router
from tests.support.paths import upstream_decoding

REFUSED = None

NORMAL_FORMS = [
    # already normal: returned as the very same object
    ("/", "/"),
    ("/a/b", "/a/b"),
    ("/a/b/", "/a/b/"),
    ("/.well-known/x", "/.well-known/x"),
    ("/v1.2/a-b_c~d/e:f@g!$&'()*+,=", "/v1.2/a-b_c~d/e:f@g!$&'()*+,="),
    # unreserved escapes decoded, any case (RFC 3986 §6.2.2.2)
    ("/%6Awt/secret", "/jwt/secret"),
    ("/%6awt/secret", "/jwt/secret"),
    ("/%41%7e%7E%2D%5F", "/A~~-_"),
    # other escapes stay, in upper case (§6.2.2.1), decoded once only
    ("/a%3fb", "/a%3Fb"),
    ("/a%20b", "/a%20b"),
    ("/%252F", "/%252F"),
    ("/%252e%252e/x", "/%252e%252e/x"),
    ("/%c0%ae%c0%ae/jwt", "/%C0%AE%C0%AE/jwt"),  # overlong UTF-8 for "." is not a dot
    ("/%e0%80%ae", "/%E0%80%AE"),
    ("/%ff", "/%FF"),
    ("/a%3bx", REFUSED),  # an encoded ; is a parameter to a server that decodes first
    # dot segments removed after decoding (§5.2.4); // collapsed; a trailing slash kept
    ("/public/../admin", "/admin"),
    ("/a/%2E%2E/b", "/b"),
    ("/a/%2e%2e/b", "/b"),
    ("/a/.%2e/b", "/b"),
    ("/a/%2e/b", "/a/b"),
    ("/.%2e/x", "/x"),
    ("/../../etc/passwd", "/etc/passwd"),
    ("/a/./b//c/", "/a/b/c/"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/..", "/"),
    ("//", "/"),
    ("//jwt/secret", "/jwt/secret"),
    ("/...", "/..."),
    # ; elsewhere in a segment stays
    ("/a;x/b", "/a;x/b"),
    ("/users/7;v=1", "/users/7;v=1"),
    ("/a..;x/b", "/a..;x/b"),
    # refused: encoded slashes (default), malformed escapes, control characters, backslash
    ("/jwt%2fsecret", REFUSED),
    ("/jwt%2Fsecret", REFUSED),
    ("/x/..%2fjwt/secret", REFUSED),
    ("/jwt%5csecret", REFUSED),
    ("/jwt%5Csecret", REFUSED),
    ("/%", REFUSED),
    ("/a%", REFUSED),
    ("/%G1", REFUSED),
    ("/%4", REFUSED),
    ("/%+1", REFUSED),
    ("/a%00", REFUSED),
    ("/a%1f", REFUSED),
    ("/a%7F", REFUSED),
    ("/a%0d%0aX: y", REFUSED),
    ("/a\x00b", REFUSED),
    ("/a\tb", REFUSED),
    ("/a\x7fb", REFUSED),
    ("/a\\b", REFUSED),
    ("/jwt\\secret", REFUSED),
    # refused: path parameters on dot or empty segments (read as /../ or // by servlet containers)
    ("/..;/jwt/secret", REFUSED),
    ("/x/..;/jwt/secret", REFUSED),
    ("/x/..;x=1/jwt", REFUSED),
    ("/.;x/jwt", REFUSED),
    ("/x/%2e%2e;/jwt", REFUSED),
    ("/a/;x/b", REFUSED),
    ("/a/b/;jsessionid=1", REFUSED),
]

UNESCAPED_FORMS = [
    ("/jwt%2fsecret", "/jwt/secret"),
    ("/jwt%2Fsecret", "/jwt/secret"),
    ("/jwt%5csecret", "/jwt/secret"),
    ("/x/..%2fjwt/secret", "/jwt/secret"),
    ("/x%2F%2e%2E%2Fjwt", "/jwt"),
    ("/a%2F%2Fb/", "/a/b/"),
    ("/%252F", "/%252F"),
    # a ; beside an encoded slash: such a server strips the parameter before decoding, so it
    # would cut the path into segments elsewhere
    ("/a;x%2f../jwt", REFUSED),
    ("/jwt%2f;x/secret", REFUSED),
    ("/a;x/b%2fc", REFUSED),
    # still refused in this mode
    ("/%", REFUSED),
    ("/a%00", REFUSED),
    ("/..;/jwt", REFUSED),
    ("/a\\b", REFUSED),
]


def normal_form(path: str, unescape_slashes: bool = False) -> str | None:
    try:
        return normalize_path(path, unescape_slashes)
    except PathRefused:
        return REFUSED


@pytest.mark.parametrize(("path", "expected"), NORMAL_FORMS)
def test_normal_form_by_default(path: str, expected: str | None) -> None:
    assert normal_form(path) == expected


@pytest.mark.parametrize(("path", "expected"), UNESCAPED_FORMS)
def test_normal_form_when_escaped_slashes_are_unescaped(path: str, expected: str | None) -> None:
    assert normal_form(path, unescape_slashes=True) == expected


WITHOUT_ESCAPED_SLASHES = [
    (path, expected)
    for path, expected in NORMAL_FORMS
    if "%2f" not in path.lower() and "%5c" not in path.lower()
]


@pytest.mark.parametrize(("path", "expected"), WITHOUT_ESCAPED_SLASHES)
def test_unescaping_slashes_changes_nothing_else(path: str, expected: str | None) -> None:
    assert normal_form(path, unescape_slashes=True) == expected


def test_a_normal_path_is_returned_without_a_copy() -> None:
    path = "".join(["/api/v1/", "users/7"])  # built at run time: not an interned constant
    assert normalize_path(path) is path


def test_normal_form_is_a_fixed_point() -> None:
    for path, expected in NORMAL_FORMS + UNESCAPED_FORMS:
        if expected is not None:
            assert normalize_path(expected) == expected, path


def test_refusals_say_what_is_wrong() -> None:
    with pytest.raises(PathRefused, match="encoded slash"):
        normalize_path("/jwt%2fsecret")
    with pytest.raises(PathRefused, match="malformed percent-escape"):
        normalize_path("/%G1")
    with pytest.raises(PathRefused, match="control characters"):
        normalize_path("/%00")
    with pytest.raises(PathRefused, match="backslash"):
        normalize_path("/a\\b")
    with pytest.raises(PathRefused, match=r"path parameter \(;\) on an empty or dot segment"):
        normalize_path("/..;/x")


def test_split_target_sends_the_normal_form_and_keeps_the_query_as_sent() -> None:
    assert split_target(b"/%6Awt/%2e%2e/jwt/x?a=%2f&b=..") == ("/jwt/x", b"/jwt/x", b"a=%2f&b=..", None)
    assert split_target(b"/jwt%2fx?q", unescape_slashes=True) == ("/jwt/x", b"/jwt/x", b"q", None)
    assert split_target(b"http://api.test/%6Awt/x") == ("/jwt/x", b"/jwt/x", b"", b"api.test")
    with pytest.raises(PathRefused):
        split_target(b"/jwt%2fx?q")
    with pytest.raises(PathRefused):
        split_target(b"http://example.com/jwt%2fx")
    raw = b"/already/normal"
    path, raw_path, query, _ = split_target(raw)
    assert (path, raw_path, query) == ("/already/normal", raw, b"")
    assert raw_path is raw  # nothing re-encoded for a normal path


# -- the router and path parameters -----------------------------------------------------------------


ROUTES = ["/jwt/*", "/jwt/secret", "/users/{id}", "/users/me", "/*"]


def make_router() -> Router:
    return Router(RouteEntry(path=path, payload=path, order=i) for i, path in enumerate(ROUTES))


def route_of(router: Router, path: str) -> str | None:
    match = router.match("GET", path, None, [])
    return match.payload if isinstance(match, RouteMatch) else None


def test_router_compares_literal_segments_without_path_parameters() -> None:
    router = make_router()
    assert route_of(router, "/jwt;x/secret") == "/jwt/secret"
    assert route_of(router, "/jwt/secret;jsessionid=1") == "/jwt/secret"
    assert route_of(router, "/jwt;x/other") == "/jwt/*"
    assert route_of(router, "/users/me;v=2") == "/users/me"
    assert route_of(router, "/jwtx;a/secret") == "/*"


def test_router_keeps_path_parameters_in_values_prefix_and_remainder() -> None:
    router = make_router()
    assert router.match("GET", "/users/7;v=1", None, []) == RouteMatch(
        "/users/{id}", {"id": "7;v=1"}, None, None
    )
    assert router.match("GET", "/jwt;x/a;b", None, []) == RouteMatch("/jwt/*", {}, "/a;b", "/jwt;x")


# -- configuration ----------------------------------------------------------------------------------


def test_escaped_slashes_setting_defaults_to_reject_and_names_the_field() -> None:
    assert GatewayConfig().paths.escaped_slashes == "reject"
    assert GatewayConfig.model_validate({"paths": {"escaped_slashes": "unescape"}}).paths.escaped_slashes == (
        "unescape"
    )
    with pytest.raises(ValidationError) as info:
        GatewayConfig.model_validate({"paths": {"escaped_slashes": "keep"}})
    assert info.value.errors()[0]["loc"] == ("paths", "escaped_slashes")
    with pytest.raises(ValidationError):
        GatewayConfig.model_validate({"paths": {"normalize": False}})


@pytest.mark.parametrize("path", ["/a//b", "/a/../b", "/a/./b", "/%6Awt/*", "/jwt;x/*", "/a%2fb", "/a%3fb"])
def test_route_paths_no_normalised_request_could_meet_are_config_errors(path: str) -> None:
    with pytest.raises(ValidationError, match="normal form"):
        RouteConfig(path=path, target="http://127.0.0.1:1")


@pytest.mark.parametrize("path", ["/", "/*", "/a/", "/api/v1/*", "/users/{id}", "/.well-known/x", "/a%3Fb"])
def test_route_paths_in_normal_form_are_accepted(path: str) -> None:
    assert RouteConfig(path=path, target="http://127.0.0.1:1").path == path


# -- differential property: the gateway's route is the upstream's route, or a refusal ---------------

PIECES = [
    "jwt", "secret", "users", "me", "7", "a", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C",
    ";", ";x", "%6A", "%6a", "%41", "%7e", "%25", "2f", "2e", "%00", "%3b", "\\", "/", "//",
]  # fmt: skip


paths = st.lists(st.sampled_from(PIECES), max_size=8).map(lambda pieces: "/" + "".join(pieces))


@pytest.mark.parametrize("unescape_slashes", [False, True])
@settings(max_examples=1500, derandomize=True, database=None, deadline=None)
@given(path=paths)
def test_the_route_matched_is_the_route_the_upstream_decoding_matches(
    path: str, unescape_slashes: bool
) -> None:
    normal = normal_form(path, unescape_slashes)
    if normal is REFUSED:
        return
    router = make_router()
    assert route_of(router, normal) == route_of(router, upstream_decoding(path)), (path, normal)


def test_the_reference_decoding_sees_the_bypasses() -> None:
    """The property above is only as good as its reference: it must read the attacks as /jwt/..."""
    for attack in [
        "/jwt%2fsecret",
        "/%6Awt/secret",
        "/x/..%2fjwt/secret",
        "/..;/jwt/secret",
        "/jwt;x/secret",
    ]:
        assert upstream_decoding(attack) == "/jwt/secret", attack
