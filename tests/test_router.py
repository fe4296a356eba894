"""Route matcher: path kinds, precedence, conditions, 405, cache bounds, large tables."""

from __future__ import annotations

import pytest

from apigate.engine.router import MethodNotAllowed, RouteEntry, RouteMatch, Router


def entry(path: str, payload: object = None, **kwargs: object) -> RouteEntry:
    return RouteEntry(path=path, payload=path if payload is None else payload, **kwargs)  # type: ignore[arg-type]


def hit(
    router: Router,
    path: str,
    method: str = "GET",
    host: str | None = "example.com",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> RouteMatch:
    result = router.match(method, path, host, headers or [])
    assert isinstance(result, RouteMatch), f"{method} {path}: {result!r}"
    return result


def payload(router: Router, path: str, **kwargs: object) -> object:
    return hit(router, path, **kwargs).payload  # type: ignore[arg-type]


# --- path kinds -------------------------------------------------------------------------------


def test_exact_route():
    router = Router([entry("/a/b")])
    match = hit(router, "/a/b")
    assert match == RouteMatch("/a/b", {}, None, None)
    assert router.match("GET", "/a", None, []) is None
    assert router.match("GET", "/a/b/c", None, []) is None


def test_exact_trailing_slash_is_significant():
    router = Router([entry("/a/b", "no-slash"), entry("/a/b/", "slash"), entry("/", "root")])
    assert payload(router, "/a/b") == "no-slash"
    assert payload(router, "/a/b/") == "slash"
    assert payload(router, "/") == "root"
    assert Router([entry("/a/b")]).match("GET", "/a/b/", None, []) is None
    assert Router([entry("/a/b/")]).match("GET", "/a/b", None, []) is None


def test_templated_params():
    router = Router([entry("/users/{id}/orders/{oid}")])
    match = hit(router, "/users/7/orders/42")
    assert match.params == {"id": "7", "oid": "42"}
    assert match.remainder is None and match.prefix is None


def test_param_matches_one_non_empty_segment():
    router = Router([entry("/users/{id}")])
    assert hit(router, "/users/abc").params == {"id": "abc"}
    assert router.match("GET", "/users/", None, []) is None
    assert router.match("GET", "/users", None, []) is None
    assert router.match("GET", "/users/a/b", None, []) is None


def test_templated_trailing_slash():
    router = Router([entry("/users/{id}/", "slash")])
    assert payload(router, "/users/1/") == "slash"
    assert router.match("GET", "/users/1", None, []) is None


def test_params_are_a_fresh_dict_each_time():
    router = Router([entry("/users/{id}")])
    hit(router, "/users/1").params["id"] = "tampered"
    assert hit(router, "/users/1").params == {"id": "1"}


def test_same_shape_different_param_names():
    router = Router(
        [
            entry("/u/{id}", "by-id", hosts=("a.test",)),
            entry("/u/{name}", "by-name"),
        ]
    )
    assert hit(router, "/u/x", host="a.test").params == {"id": "x"}
    assert hit(router, "/u/x", host="b.test").params == {"name": "x"}


@pytest.mark.parametrize(
    ("path", "prefix", "remainder"),
    [
        ("/api/v1", "/api/v1", "/"),
        ("/api/v1/", "/api/v1", "/"),
        ("/api/v1/users", "/api/v1", "/users"),
        ("/api/v1/users/7/", "/api/v1", "/users/7/"),
        ("/api/v1//x", "/api/v1", "//x"),
    ],
)
def test_prefix_remainder(path: str, prefix: str, remainder: str):
    match = hit(Router([entry("/api/v1/*")]), path)
    assert (match.prefix, match.remainder, match.params) == (prefix, remainder, {})


def test_prefix_is_segment_aligned():
    router = Router([entry("/api/v1/*")])
    assert router.match("GET", "/api/v1x", None, []) is None
    assert router.match("GET", "/api/v1x/y", None, []) is None
    assert router.match("GET", "/api", None, []) is None


@pytest.mark.parametrize(("path", "remainder"), [("/", "/"), ("/x", "/x"), ("/x/y/", "/x/y/")])
def test_root_prefix_matches_everything(path: str, remainder: str):
    match = hit(Router([entry("/*")]), path)
    assert (match.prefix, match.remainder) == ("", remainder)


def test_prefix_with_params():
    router = Router([entry("/t/{tenant}/*")])
    match = hit(router, "/t/acme/files/a.txt")
    assert match.params == {"tenant": "acme"}
    assert (match.prefix, match.remainder) == ("/t/acme", "/files/a.txt")
    match = hit(router, "/t/acme")
    assert (match.prefix, match.remainder) == ("/t/acme", "/")
    assert router.match("GET", "/t/", None, []) is None


# --- path precedence --------------------------------------------------------------------------


def test_exact_beats_templated_beats_prefix():
    routes = [entry("/users/*", "prefix"), entry("/users/{id}", "templated"), entry("/users/me", "exact")]
    for table in (routes, routes[::-1]):
        router = Router(table)
        assert payload(router, "/users/me") == "exact"
        assert payload(router, "/users/42") == "templated"
        assert payload(router, "/users/42/x") == "prefix"


def test_exact_path_beats_prefix_of_same_path():
    router = Router([entry("/api/*", "prefix"), entry("/api", "exact")])
    assert payload(router, "/api") == "exact"
    assert payload(router, "/api/") == "prefix"


def test_templated_static_beats_param_at_first_difference():
    routes = [
        entry("/{a}/b/c", "pss"),
        entry("/a/{b}/c", "sps"),
        entry("/a/b/{c}", "ssp"),
        entry("/{a}/{b}/{c}", "ppp"),
    ]
    for table in (routes, routes[::-1]):
        router = Router(table)
        assert payload(router, "/a/b/c") == "ssp"
        assert payload(router, "/a/x/c") == "sps"
        assert payload(router, "/x/b/c") == "pss"
        assert payload(router, "/x/y/z") == "ppp"


def test_templated_leftmost_difference_decides():
    # "/a/{x}/{y}" has its static segment further left than "/{x}/b/c", so it wins even though
    # the other pattern has more static segments overall.
    routes = [entry("/{x}/b/c", "right"), entry("/a/{x}/{y}", "left")]
    for table in (routes, routes[::-1]):
        assert payload(Router(table), "/a/b/c") == "left"


def test_longer_prefix_wins():
    routes = [entry("/*", "root"), entry("/api/*", "api"), entry("/api/v1/*", "v1")]
    for table in (routes, routes[::-1]):
        router = Router(table)
        assert payload(router, "/api/v1/x") == "v1"
        assert payload(router, "/api/v1") == "v1"
        assert payload(router, "/api/v2") == "api"
        assert payload(router, "/other") == "root"
        match = hit(router, "/api/v2/z")
        assert (match.prefix, match.remainder) == ("/api", "/v2/z")


def test_longer_param_prefix_beats_shorter_static_prefix():
    routes = [entry("/a/*", "short-static"), entry("/{x}/b/*", "long-param")]
    for table in (routes, routes[::-1]):
        router = Router(table)
        assert payload(router, "/a/b/c") == "long-param"
        assert payload(router, "/a/c") == "short-static"


def test_equal_length_prefix_static_beats_param():
    routes = [entry("/{t}/files/*", "pp"), entry("/t/{x}/*", "sp"), entry("/t/files/*", "ss")]
    for table in (routes, routes[::-1]):
        router = Router(table)
        assert payload(router, "/t/files/a") == "ss"
        assert payload(router, "/t/other/a") == "sp"
        assert payload(router, "/u/files/a") == "pp"


def test_falls_back_to_less_specific_path_when_conditions_fail():
    router = Router(
        [
            entry("/users/me", "exact", methods=frozenset({"POST"})),
            entry("/users/{id}", "templated", hosts=("internal.test",)),
            entry("/users/*", "prefix"),
        ]
    )
    assert payload(router, "/users/me", method="POST") == "exact"
    assert payload(router, "/users/me", host="internal.test") == "templated"
    assert payload(router, "/users/me") == "prefix"


# --- condition precedence ---------------------------------------------------------------------


def test_exact_host_beats_wildcard_beats_none():
    routes = [
        entry("/x", "none"),
        entry("/x", "wild", hosts=("*.example.com",)),
        entry("/x", "exact", hosts=("api.example.com",)),
    ]
    for table in (routes, routes[::-1]):
        router = Router(table)
        assert payload(router, "/x", host="api.example.com") == "exact"
        assert payload(router, "/x", host="www.example.com") == "wild"
        assert payload(router, "/x", host="other.test") == "none"
        assert payload(router, "/x", host=None) == "none"


def test_longer_wildcard_beats_shorter():
    routes = [
        entry("/x", "short", hosts=("*.example.com",)),
        entry("/x", "long", hosts=("*.eu.example.com",)),
    ]
    for table in (routes, routes[::-1]):
        router = Router(table)
        assert payload(router, "/x", host="a.eu.example.com") == "long"
        assert payload(router, "/x", host="a.us.example.com") == "short"


def test_route_with_several_hosts_ranks_by_the_host_that_matched():
    routes = [
        entry("/x", "multi", hosts=("*.example.com", "api.other.test")),
        entry("/x", "specific", hosts=("api.example.com",)),
        entry("/x", "wild-other", hosts=("*.other.test",)),
    ]
    for table in (routes, routes[::-1]):
        router = Router(table)
        assert payload(router, "/x", host="api.example.com") == "specific"  # exact beats wildcard
        assert payload(router, "/x", host="www.example.com") == "multi"
        assert payload(router, "/x", host="api.other.test") == "multi"  # its exact host now
        assert payload(router, "/x", host="www.other.test") == "wild-other"


def test_more_headers_beat_fewer():
    routes = [
        entry("/x", "zero"),
        entry("/x", "one", headers=((b"x-a", b"1"),)),
        entry("/x", "two", headers=((b"x-a", b"1"), (b"x-b", None))),
    ]
    for table in (routes, routes[::-1]):
        router = Router(table)
        assert payload(router, "/x", headers=[(b"x-a", b"1"), (b"x-b", b"anything")]) == "two"
        assert payload(router, "/x", headers=[(b"x-a", b"1")]) == "one"
        assert payload(router, "/x", headers=[(b"x-b", b"1")]) == "zero"


def test_host_ranks_before_headers():
    routes = [
        entry("/x", "headers", headers=((b"x-a", b"1"), (b"x-b", b"2"))),
        entry("/x", "host", hosts=("*.example.com",)),
    ]
    for table in (routes, routes[::-1]):
        router = Router(table)
        assert payload(router, "/x", host="a.example.com", headers=[(b"x-a", b"1"), (b"x-b", b"2")]) == "host"


def test_methods_condition_beats_none():
    routes = [entry("/x", "any"), entry("/x", "get", methods=frozenset({"GET"}))]
    for table in (routes, routes[::-1]):
        router = Router(table)
        assert payload(router, "/x", method="GET") == "get"
        assert payload(router, "/x", method="POST") == "any"


def test_headers_rank_before_methods():
    routes = [
        entry("/x", "method", methods=frozenset({"GET"})),
        entry("/x", "header", headers=((b"x-a", None),)),
    ]
    for table in (routes, routes[::-1]):
        assert payload(Router(table), "/x", headers=[(b"x-a", b"")]) == "header"


def test_path_specificity_ranks_before_conditions():
    router = Router(
        [
            entry("/users/{id}", "templated-host", hosts=("api.example.com",), methods=frozenset({"GET"})),
            entry("/users/me", "exact-plain"),
        ]
    )
    assert payload(router, "/users/me", host="api.example.com") == "exact-plain"


def test_declared_order_breaks_ties():
    router = Router([entry("/x", "second", order=2), entry("/x", "first", order=1)])
    assert payload(router, "/x") == "first"
    # Equal order: the entry given first wins.
    router = Router([entry("/x/{id}", "a"), entry("/x/{id}", "b")])
    assert payload(router, "/x/1") == "a"
    router = Router([entry("/x/*", "a", hosts=("h.test",)), entry("/x/*", "b", hosts=("h.test",))])
    assert payload(router, "/x/1", host="h.test") == "a"


# --- host conditions --------------------------------------------------------------------------


def test_host_exact():
    router = Router([entry("/x", hosts=("api.example.com",))])
    assert payload(router, "/x", host="api.example.com") == "/x"
    assert router.match("GET", "/x", "www.example.com", []) is None
    assert router.match("GET", "/x", None, []) is None
    assert router.match("GET", "/x", "", []) is None


def test_host_port_and_case_ignored():
    router = Router([entry("/x", hosts=("api.example.com",))])
    for host in ("api.example.com:8080", "API.Example.COM", "Api.Example.Com:443", "api.example.com."):
        assert payload(router, "/x", host=host) == "/x"
    # A port written in the condition is ignored as well.
    assert (
        payload(Router([entry("/x", hosts=("api.example.com:8443",))]), "/x", host="api.example.com") == "/x"
    )


def test_host_ipv6_literal():
    router = Router([entry("/x", hosts=("[::1]",))])
    assert payload(router, "/x", host="[::1]:8080") == "/x"
    assert payload(router, "/x", host="[::1]") == "/x"


def test_wildcard_host():
    router = Router([entry("/x", hosts=("*.example.com",))])
    for host in ("a.example.com", "a.b.example.com", "A.EXAMPLE.COM:80"):
        assert payload(router, "/x", host=host) == "/x"
    for host in ("example.com", "badexample.com", "example.com.evil.test", ".example.com", None):
        assert router.match("GET", "/x", host, []) is None


def test_any_of_several_hosts():
    router = Router([entry("/x", hosts=("a.test", "*.b.test"))])
    assert payload(router, "/x", host="a.test") == "/x"
    assert payload(router, "/x", host="x.b.test") == "/x"
    assert router.match("GET", "/x", "c.test", []) is None


# --- header conditions ------------------------------------------------------------------------


def test_header_exact_value():
    router = Router([entry("/x", headers=((b"x-version", b"2"),))])
    assert payload(router, "/x", headers=[(b"x-version", b"2")]) == "/x"
    assert router.match("GET", "/x", None, [(b"x-version", b"3")]) is None
    assert router.match("GET", "/x", None, [(b"x-version", b"2 ")]) is None
    assert router.match("GET", "/x", None, []) is None
    # Any of several same-named headers may carry the value.
    assert payload(router, "/x", headers=[(b"x-version", b"1"), (b"x-version", b"2")]) == "/x"


def test_header_presence():
    router = Router([entry("/x", headers=((b"authorization", None),))])
    assert payload(router, "/x", headers=[(b"accept", b"*/*"), (b"authorization", b"")]) == "/x"
    assert router.match("GET", "/x", None, [(b"accept", b"*/*")]) is None


def test_header_condition_names_are_case_insensitive():
    router = Router([entry("/x", headers=((b"X-Version", b"2"), (b"X-Token", None)))])
    assert payload(router, "/x", headers=[(b"x-version", b"2"), (b"x-token", b"t")]) == "/x"


def test_all_header_conditions_must_hold():
    router = Router([entry("/x", headers=((b"x-a", b"1"), (b"x-b", None)))])
    assert router.match("GET", "/x", None, [(b"x-a", b"1")]) is None
    assert router.match("GET", "/x", None, [(b"x-b", b"1")]) is None


# --- 405 and 404 ------------------------------------------------------------------------------


def test_method_not_allowed_with_union():
    router = Router(
        [
            entry("/x", "get", methods=frozenset({"GET", "HEAD"})),
            entry("/x", "post", methods=frozenset({"POST"})),
            entry("/x/*", "put", methods=frozenset({"PUT"})),
            entry("/x", "other-host", hosts=("other.test",), methods=frozenset({"DELETE"})),
        ]
    )
    result = router.match("PATCH", "/x", "example.com", [])
    assert result == MethodNotAllowed(("GET", "HEAD", "POST", "PUT"))
    assert payload(router, "/x", method="POST") == "post"
    assert payload(router, "/x", method="PUT") == "put"


def test_method_not_allowed_loses_to_any_full_match():
    router = Router([entry("/x", "get", methods=frozenset({"GET"})), entry("/*", "fallback")])
    assert payload(router, "/x", method="POST") == "fallback"


def test_method_not_allowed_ignores_candidates_failing_other_conditions():
    router = Router(
        [
            entry("/x", methods=frozenset({"GET"}), headers=((b"x-a", None),)),
            entry("/x", methods=frozenset({"PUT"}), hosts=("a.test",)),
        ]
    )
    assert router.match("POST", "/x", "b.test", []) is None
    assert router.match("POST", "/x", "b.test", [(b"x-a", b"")]) == MethodNotAllowed(("GET",))


def test_no_match_is_none():
    router = Router([entry("/a"), entry("/b/{id}"), entry("/c/*")])
    for path in ("/", "/z", "/b", "/cc", "/a/b"):
        assert router.match("GET", path, "example.com", []) is None
    assert Router([]).match("GET", "/", None, []) is None


def test_method_is_case_sensitive():
    router = Router([entry("/x", methods=frozenset({"GET"}))])
    assert router.match("get", "/x", None, []) == MethodNotAllowed(("GET",))


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["x", "/a/*/b", "/a*", "/a/{id", "/a/x{id}", "/a/{}"])
def test_invalid_paths_rejected(path: str):
    with pytest.raises(ValueError):
        Router([entry(path)])


# --- scale and cache --------------------------------------------------------------------------


def test_thousand_exact_routes_each_resolve_to_their_own_payload():
    router = Router([entry(f"/svc{i}/status", i) for i in range(1000)])
    for i in range(1000):
        assert payload(router, f"/svc{i}/status") == i
    assert router.match("GET", "/svc1000/status", None, []) is None


def test_thousand_route_mixed_table():
    routes: list[RouteEntry] = []
    for i in range(250):
        routes.append(entry(f"/e{i}", ("exact", i)))
        routes.append(entry(f"/t{i}/{{id}}/items/{{item}}", ("templated", i)))
        routes.append(entry(f"/p{i}/*", ("prefix", i)))
        routes.append(entry(f"/h/{i}", ("host", i), hosts=(f"h{i}.example.com",)))
    router = Router(routes)
    for i in range(250):
        assert payload(router, f"/e{i}") == ("exact", i)
        match = hit(router, f"/t{i}/u{i}/items/{i * 7}")
        assert (match.payload, match.params) == (("templated", i), {"id": f"u{i}", "item": str(i * 7)})
        match = hit(router, f"/p{i}/deep/er")
        assert (match.payload, match.prefix, match.remainder) == (("prefix", i), f"/p{i}", "/deep/er")
        assert payload(router, f"/h/{i}", host=f"h{i}.example.com") == ("host", i)
        assert router.match("GET", f"/h/{i}", f"h{i + 1}.example.com", []) is None


def test_cache_stays_bounded():
    router = Router([entry("/users/{id}"), entry("/*", "fallback")], cache_size=16)
    for i in range(100):
        assert hit(router, f"/users/{i}").params == {"id": str(i)}
        assert len(router._cache) <= 16
    for i in range(100):  # results stay correct after clears
        assert hit(router, f"/users/{i}").params == {"id": str(i)}
        assert payload(router, f"/other/{i}") == "fallback"
        assert len(router._cache) <= 16


def test_cache_holds_path_results_only():
    router = Router(
        [
            entry("/x", "a", hosts=("a.test",)),
            entry("/x", "get", methods=frozenset({"GET"})),
            entry("/x", "hdr", headers=((b"x-a", b"1"),)),
        ]
    )
    # Same path, different hosts/methods/headers on consecutive (cached) lookups.
    assert payload(router, "/x", host="a.test") == "a"
    assert payload(router, "/x", host="b.test", headers=[(b"x-a", b"1")]) == "hdr"
    assert payload(router, "/x", host="b.test") == "get"
    assert router.match("POST", "/x", "b.test", []) == MethodNotAllowed(("GET",))


def test_cache_disabled():
    router = Router([entry("/users/{id}")], cache_size=0)
    assert hit(router, "/users/1").params == {"id": "1"}
    assert router._cache == {}
