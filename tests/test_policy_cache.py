"""The `cache` policy: the freshness rules (RFC 9111) with explicit times, the store (bounds, LRU,
Vary, purge, collapsed misses), and a real gateway in front of a real upstream that counts what
reaches it: hits, misses, what is never stored, Vary, 304s, HEAD from GET, invalidation by unsafe
methods, concurrent misses collapsed into one upstream request, a large body passed and not
stored, consumers kept apart, and arbitrary cache headers."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apigate.config.loader import ConfigError, load_config
from apigate.engine.replies import Reply
from apigate.policies.cache import CachePolicy
from apigate.policies.cache import freshness as rules
from apigate.policies.cache.store import CacheStore, Entry, normalised_query, vary_values
from tests.support.errors_helpers import wait_until
from tests.support.exchanges import request_exchange
from tests.support.proxy_http import RawConnection, RawResponse, running_gateway
from tests.support.upstream import made_body

T0 = 1_700_000_000.0  # an instant; every time in the unit tests is relative to it
KEY = "partner-declared-key-0123456789abcdef"
OTHER_KEY = "other-declared-key-0123456789abcdef"
_tags = itertools.count()


# -- freshness, with explicit times ----------------------------------------------------------------
def lifetime(headers: list[tuple[bytes, bytes]], status: int = 200, ttl: float | None = None) -> float | None:
    found = rules.freshness_lifetime(status, rules.cache_control(headers), headers, ttl, 86_400.0)
    return None if found is None else found.seconds


def test_s_maxage_wins_over_max_age_which_wins_over_expires_and_the_ttl() -> None:
    date = [(b"date", rules.format_http_date(T0)), (b"expires", rules.format_http_date(T0 + 300))]
    assert lifetime([(b"cache-control", b"max-age=10, s-maxage=20"), *date], ttl=99) == 20
    assert lifetime([(b"cache-control", b"max-age=10"), *date], ttl=99) == 10
    assert lifetime(date, ttl=99) == 300
    assert lifetime([(b"date", rules.format_http_date(T0))], ttl=99) == 99
    assert lifetime([(b"cache-control", b"max-age=0")], ttl=99) == 0  # explicit: the ttl does not apply


def test_the_ttl_and_the_heuristic_apply_only_to_statuses_cacheable_by_default() -> None:
    assert lifetime([], status=500, ttl=60) is None
    assert lifetime([], status=404, ttl=60) == 60
    assert lifetime([(b"cache-control", b"public")], status=500, ttl=60) == 60
    assert lifetime([(b"cache-control", b"max-age=5")], status=500) == 5


def test_heuristic_freshness_is_a_tenth_of_the_time_since_last_modified_capped() -> None:
    recent = [(b"date", rules.format_http_date(T0)), (b"last-modified", rules.format_http_date(T0 - 1000))]
    assert lifetime(recent) == pytest.approx(100)
    old = [(b"date", rules.format_http_date(T0)), (b"last-modified", rules.format_http_date(T0 - 10**8))]
    assert lifetime(old) == 86_400
    assert lifetime([(b"date", rules.format_http_date(T0))]) is None  # nothing to go by


def test_malformed_freshness_counts_as_stale() -> None:
    assert lifetime([(b"cache-control", b"max-age=soon")], ttl=60) == 0
    assert lifetime([(b"expires", b"0"), (b"date", rules.format_http_date(T0))], ttl=60) == 0


def test_age_follows_rfc_9111_section_4_2_3() -> None:
    headers = [(b"date", rules.format_http_date(T0 - 10)), (b"age", b"3")]
    # Apparent age 10 (Date is 10 s old on arrival) beats Age 3 plus a 2 s round trip.
    start = rules.initial_age(headers, request_time=T0 - 2, response_time=T0)
    assert start == 10
    assert rules.current_age(start, T0, T0 + 30) == 40
    late = rules.initial_age([(b"date", rules.format_http_date(T0)), (b"age", b"50")], T0 - 2, T0)
    assert late == 52


def test_what_a_shared_cache_refuses_to_store() -> None:
    def why(headers: list[tuple[bytes, bytes]], **changes: object) -> bytes | None:
        args: dict[str, object] = {
            "method": "GET",
            "status": 200,
            "request_directives": {},
            "directives": rules.cache_control(headers),
            "headers": headers,
            "authorized": False,
            "store_set_cookie": False,
        }
        args.update(changes)
        return rules.refusal(**args)  # type: ignore[arg-type]

    assert why([]) is None
    assert why([], method="POST") == b"method"
    assert why([], status=206) == b"status"
    assert why([(b"cache-control", b"private, max-age=60")]) == b"private"
    assert why([(b"cache-control", b"no-store")]) == b"no-store"
    assert why([], request_directives={b"no-store": None}) == b"no-store"
    assert why([(b"set-cookie", b"a=1")]) == b"set-cookie"
    assert why([(b"set-cookie", b"a=1")], store_set_cookie=True) is None
    assert why([(b"vary", b"accept, *")]) == b"vary"
    assert why([], authorized=True) == b"authorization"
    for allowed in (b"public", b"s-maxage=5", b"must-revalidate, max-age=5"):
        assert why([(b"cache-control", allowed)], authorized=True) is None


def test_cache_control_parsing_and_vary_names() -> None:
    directives = rules.cache_control(
        [(b"cache-control", b'Max-Age="30", private="set-cookie, x"'), (b"cache-control", b"max-age=5")]
    )
    assert directives == {b"max-age": b"30", b"private": b"set-cookie, x"}
    assert rules.vary_names([(b"vary", b"Accept-Language, accept"), (b"vary", b"X-Tenant")]) == (
        b"accept",
        b"accept-language",
        b"x-tenant",
    )
    assert rules.vary_names([(b"vary", b"*")]) is None


def test_conditions_answered_from_the_stored_response() -> None:
    stored = [(b"etag", b'"v1"'), (b"last-modified", rules.format_http_date(T0))]
    assert rules.etag_matches(b'"v0", W/"v1"', b'"v1"')
    assert not rules.etag_matches(b'"v2"', b'"v1"')
    assert rules.not_modified([(b"if-none-match", b"*")], stored)
    assert rules.not_modified([(b"if-modified-since", rules.format_http_date(T0))], stored)
    assert not rules.not_modified([(b"if-modified-since", rules.format_http_date(T0 - 1))], stored)
    # If-None-Match decides when both are sent (RFC 9110 §13.2.2).
    assert not rules.not_modified(
        [(b"if-none-match", b'"v2"'), (b"if-modified-since", rules.format_http_date(T0))], stored
    )


# -- the store -------------------------------------------------------------------------------------
def entry(
    path: str,
    body: bytes = b"x",
    *,
    vary: tuple[bytes, ...] = (),
    varies: tuple[bytes | None, ...] = (),
    route: str = "r",
    partition: str = "",
) -> Entry:
    return Entry(
        uri=("h", path, b""),
        partition=partition,
        route=route,
        vary=vary,
        varies=varies,
        status=200,
        headers=[],
        body=body,
        response_time=T0,
        initial_age=0,
        lifetime=60,
    )


def test_the_store_evicts_the_least_recently_used_past_its_bounds() -> None:
    store = CacheStore(max_bytes=10_000, max_entries=3, clock=lambda: T0)
    for name in "abc":
        assert store.put(entry(f"/{name}"))
    assert store.find(("h", "/a", b""), "", []) is not None  # /a is now the most recently used
    store.put(entry("/d"))
    assert store.find(("h", "/b", b""), "", []) is None
    assert len(store) == 3
    assert not store.put(entry("/huge", b"x" * 20_000))
    store.put(entry("/big", b"x" * 9600))
    assert len(store) == 1 and store.size <= 10_000


def test_the_store_selects_by_vary_and_partition_and_purges() -> None:
    store = CacheStore(max_bytes=1 << 20, max_entries=100)
    names = (b"accept-language",)
    store.put(entry("/v", b"en", vary=names, varies=vary_values([(b"accept-language", b"en")], names)))
    store.put(entry("/v", b"de", vary=names, varies=vary_values([(b"accept-language", b"de")], names)))
    store.put(entry("/v", b"alice", partition="alice"))
    found = store.find(("h", "/v", b""), "", [(b"accept-language", b"de")])
    assert found is not None and found.body == b"de"
    assert store.find(("h", "/v", b""), "", [(b"accept-language", b"fr")]) is None
    assert store.find(("h", "/v", b""), "bob", []) is None
    store.put(entry("/api/x", route="other"))
    store.put(entry("/api/y", route="other"))
    assert store.purge_prefix("/api/") == 2
    store.put(entry("/api/x", route="other"))
    assert store.purge_route("other") == 1
    assert store.purge_key("H", "/v") == 3
    store.put(entry("/z"))
    assert store.purge_all() == 1 and store.size == 0


def test_query_parameters_are_sorted_in_the_key() -> None:
    assert normalised_query(b"b=2&a=1&&c") == b"a=1&b=2&c"
    assert normalised_query(b"") == b""


def test_collapsed_misses_wait_for_the_leader_or_give_up() -> None:
    async def scenario() -> tuple[object, object, object]:
        store = CacheStore(1 << 20, 10)
        key = (("h", "/p", b""), "")
        flight = store.lead(key)
        assert flight is not None and store.lead(key) is None
        answered = store.wait(key, lambda: "from the store", timeout=5)
        store.land(key, flight)
        second = store.lead(key)
        assert second is not None
        late = store.wait(key, lambda: "never", timeout=0.01)
        gave_up = await late
        store.land(key, second)
        return await answered, gave_up, store.flights

    answered, gave_up, flights = asyncio.run(scenario())
    assert answered == "from the store" and gave_up is None and flights == {}


def test_the_shorthand_is_the_policy_with_that_ttl(tmp_path) -> None:
    assert CachePolicy.expand_shorthand("60s") == {"ttl": 60.0}
    assert CachePolicy.expand_shorthand("forever") is None
    path = tmp_path / "routes.yaml"
    path.write_text("routes:\n  - path: /x\n    target: http://127.0.0.1:9\n    cache: forever\n")
    with pytest.raises(ConfigError, match="cache"):
        load_config(path)
    path.write_text(
        "routes:\n  - path: /x\n    target: http://127.0.0.1:9\n"
        "    policies:\n      cache: {max_entries: 0}\n"
    )
    with pytest.raises(ConfigError, match="max_entries"):
        load_config(path)


# -- the policy's hooks in process, on the store's injected clock ---------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def cached_policy(clock: Clock, **config: object) -> CachePolicy:
    policy = CachePolicy(CachePolicy.Config.model_validate({"collapse_wait": 0, **config}), route="r")
    policy.store = CacheStore(1 << 20, 100, clock=clock)
    return policy


def through(
    policy: CachePolicy,
    path: str,
    response_headers: list[tuple[bytes, bytes]],
    status: int = 200,
    request_headers: list[tuple[bytes, bytes]] | None = None,
) -> object:
    """One GET of ``path`` through the policy's hooks: the store's answer, or the response head
    the client got after the upstream's ``status`` with ``response_headers`` (and a body, but for
    a 304) went by, and maybe into the store."""
    exchange = request_exchange([(b"host", b"api.test"), *(request_headers or [])], path=path)
    answer = policy.on_request(exchange)
    if answer is not None:
        return answer
    exchange.t_first_byte = 1.0  # the upstream answered
    exchange.response_status = status
    exchange.response_headers = [*response_headers]
    if status != 304:
        exchange.response_headers += [(b"content-type", b"text/plain"), (b"content-length", b"4")]
    policy.on_response(exchange)
    capture = policy.on_response_body(exchange) if status != 304 else None
    if capture is not None:
        assert capture.feed(b"body") == b"body" and capture.end() == b""
    policy.on_log(exchange)
    return exchange.response_headers


def test_max_age_beats_the_route_ttl_on_the_injected_clock() -> None:
    clock = Clock()
    policy = cached_policy(clock, ttl="60s")
    assert not isinstance(through(policy, "/short", [(b"cache-control", b"max-age=10")]), Reply)
    assert not isinstance(through(policy, "/ttl", []), Reply)
    clock.now = T0 + 9
    hit = through(policy, "/short", [])
    assert isinstance(hit, Reply) and hit.status == 200 and hit.body == b"body"
    assert (b"age", b"9") in hit.headers and (b"cache-status", b"apigate; hit; ttl=1") in hit.headers
    clock.now = T0 + 10
    assert not isinstance(
        through(policy, "/short", [(b"cache-control", b"max-age=10")]), Reply
    )  # stale: forwarded
    clock.now = T0 + 59
    assert isinstance(through(policy, "/ttl", []), Reply)
    clock.now = T0 + 60
    assert not isinstance(through(policy, "/ttl", []), Reply)


def test_request_max_age_and_min_fresh_are_honoured() -> None:
    clock = Clock()
    policy = cached_policy(clock, ttl="60s")
    through(policy, "/p", [])
    clock.now = T0 + 30

    def asked(value: bytes) -> object:
        exchange = request_exchange([(b"host", b"api.test"), (b"cache-control", value)], path="/p")
        return policy.on_request(exchange)

    assert isinstance(asked(b"max-age=40"), Reply)
    assert asked(b"max-age=20") is None
    assert isinstance(asked(b"min-fresh=30"), Reply)
    assert asked(b"min-fresh=31") is None


def test_a_304_from_the_upstream_freshens_the_stale_stored_response() -> None:
    clock = Clock()
    policy = cached_policy(clock)
    through(policy, "/r", [(b"etag", b'"a"'), (b"cache-control", b"max-age=10"), (b"x-version", b"1")])
    clock.now = T0 + 20
    asked = [(b"if-none-match", b'"a"')]
    head = through(policy, "/r", [(b"etag", b'"a"'), (b"cache-control", b"max-age=30")], 304, asked)
    assert isinstance(head, list)
    assert (b"x-cache", b"REVALIDATED") in head
    assert (b"cache-status", b"apigate; fwd=stale; fwd-status=304; stored") in head
    clock.now = T0 + 25
    hit = through(policy, "/r", [])
    assert isinstance(hit, Reply) and hit.status == 200 and hit.body == b"body"
    assert (b"age", b"5") in hit.headers and (b"cache-control", b"max-age=30") in hit.headers
    assert (b"x-version", b"1") in hit.headers and (b"content-type", b"text/plain") not in hit.headers
    assert hit.content_type == b"text/plain"
    # A 304 for another representation leaves the stored one alone; one that says no-store drops it.
    clock.now = T0 + 60
    through(
        policy,
        "/r",
        [(b"etag", b'"b"'), (b"cache-control", b"max-age=30")],
        304,
        [(b"if-none-match", b'"b"')],
    )
    assert not isinstance(through(policy, "/r", [], 304, asked), Reply)
    assert len(policy.store) == 1
    through(policy, "/r", [(b"etag", b'"a"'), (b"cache-control", b"no-store")], 304, asked)
    assert len(policy.store) == 0


def test_the_date_the_upstream_sent_ages_the_response_on_the_injected_clock() -> None:
    clock = Clock()
    policy = cached_policy(clock, ttl="60s")
    through(policy, "/dated", [(b"date", rules.format_http_date(T0 - 50))])
    clock.now = T0 + 5
    hit = through(policy, "/dated", [])
    assert isinstance(hit, Reply) and (b"age", b"55") in hit.headers
    clock.now = T0 + 10
    assert not isinstance(through(policy, "/dated", []), Reply)


# -- through a real gateway ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gateway(shared_upstream, tmp_path_factory):
    target = shared_upstream.url

    def route(path: str, cache: dict | str | None, **more: object) -> dict:
        found: dict = {"path": f"/{path}/*", "target": target, "rewrite": "/made", **more}
        if isinstance(cache, str):
            found["cache"] = cache
        else:
            found["policies"] = {"cache": cache, **found.get("policies", {})}
        return found

    config = {
        "store": {"url": f"sqlite:///{tmp_path_factory.mktemp('cache-store') / 'apigate.db'}"},
        "consumers": [
            {"id": "partner", "keys": [{"key": KEY}]},
            {"id": "other", "keys": [{"key": OTHER_KEY}]},
        ],
        "routes": [
            route("c", "60s"),
            route("explicit", {}),
            route("cookies", {"ttl": "60s", "store_set_cookie": True}),
            route("limited", {"ttl": "60s", "max_entry_size": "1MiB"}),
            route(
                "per-consumer",
                None,
                policies={"key-auth": {}, "cache": {"ttl": "60s", "key_by": ["consumer"]}},
            ),
            # Waiting misses wait long here: a loaded machine must not send them upstream.
            {
                "path": "/slow/*",
                "target": target,
                "policies": {"cache": {"ttl": "60s", "collapse_wait": "30s"}},
            },
            route(
                "compressed", None, policies={"cache": {"ttl": "60s"}, "compression": {"encodings": ["gzip"]}}
            ),
        ],
    }
    with running_gateway(tmp_path_factory.mktemp("cache"), config) as gw:
        yield gw


def made(route: str = "c", **args: object) -> str:
    """A fresh URI (its own ``tag``) of a /made body through ``route``."""
    args.setdefault("tag", next(_tags))
    return f"/{route}/x?{urlencode(args, doseq=True)}"


def upstream_calls(upstream, path: str) -> int:
    """How many requests for ``path`` (by its tag) reached the upstream."""
    tag = "tag=" + path.partition("tag=")[2].partition("&")[0]
    return sum(1 for seen in list(upstream.requests) if tag in seen.query.split("&"))


def get(gateway, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> RawResponse:
    with RawConnection(gateway.port) as conn:
        return conn.exchange(method, path, headers)


def test_a_second_get_is_a_hit_without_the_upstream(gateway, shared_upstream) -> None:
    path = made(size=3000, h=['etag:"v1"'])
    first = get(gateway, path)
    assert first.status == 200 and first.body == made_body(3000)
    assert first.header("x-cache") == "MISS"
    assert first.header("cache-status") == "apigate; fwd=uri-miss; stored"
    second = get(gateway, path)
    assert second.status == 200 and second.body == made_body(3000)
    assert second.header("x-cache") == "HIT"
    assert second.header("etag") == '"v1"' and second.header("content-type") == "text/plain"
    assert second.header("age") is not None and int(second.header("age")) >= 0
    assert second.header("cache-status").startswith("apigate; hit; ttl=")
    assert second.header("x-request-id") is not None
    assert upstream_calls(shared_upstream, path) == 1


def test_query_order_does_not_matter_and_head_is_served_from_the_get_entry(gateway, shared_upstream) -> None:
    tag = next(_tags)
    assert get(gateway, f"/c/q?a=1&b=2&tag={tag}").header("x-cache") == "MISS"
    assert get(gateway, f"/c/q?tag={tag}&b=2&a=1").header("x-cache") == "HIT"
    head = get(gateway, f"/c/q?b=2&a=1&tag={tag}", method="HEAD")
    assert head.status == 200 and head.body == b"" and head.header("x-cache") == "HIT"
    assert head.header("content-length") == "4096"
    assert upstream_calls(shared_upstream, f"/c/q?tag={tag}") == 1


@pytest.mark.parametrize(
    "header",
    [
        "cache-control:private, max-age=60",
        "cache-control:no-store",
        "set-cookie:session=alice",
        "vary:*",
        "cache-control:no-cache",
    ],
)
def test_responses_a_shared_cache_must_not_store_are_never_served_again(
    gateway, shared_upstream, header
) -> None:
    path = made(h=[header])
    for _ in range(2):
        response = get(gateway, path)
        assert response.status == 200 and response.header("x-cache") == "MISS"
        assert response.header("cache-status") == "apigate; fwd=uri-miss"
    assert upstream_calls(shared_upstream, path) == 2


def test_set_cookie_is_stored_only_where_configured(gateway, shared_upstream) -> None:
    path = made("cookies", h=["set-cookie:theme=dark"])
    get(gateway, path)
    hit = get(gateway, path)
    assert hit.header("x-cache") == "HIT" and hit.header("set-cookie") == "theme=dark"
    assert upstream_calls(shared_upstream, path) == 1


def test_requests_with_authorization_reuse_only_what_rfc_9111_allows(gateway, shared_upstream) -> None:
    secret = made()
    for _ in range(2):
        assert get(gateway, secret, {"Authorization": "Bearer alice"}).header("x-cache") == "MISS"
    assert upstream_calls(shared_upstream, secret) == 2
    public = made(h=["cache-control:public"])
    get(gateway, public, {"Authorization": "Bearer alice"})
    assert get(gateway, public, {"Authorization": "Bearer bob"}).header("x-cache") == "HIT"
    assert upstream_calls(shared_upstream, public) == 1


def test_request_directives_bypass_the_store(gateway, shared_upstream) -> None:
    path = made()
    get(gateway, path)
    assert get(gateway, path, {"Cache-Control": "no-store"}).header("x-cache") == "BYPASS"
    revalidated = get(gateway, path, {"Cache-Control": "max-age=0"})
    assert revalidated.header("x-cache") == "BYPASS"
    assert revalidated.header("cache-status") == "apigate; fwd=request; stored"
    assert get(gateway, path, {"Pragma": "no-cache"}).header("x-cache") == "BYPASS"
    assert get(gateway, path).header("x-cache") == "HIT"
    assert upstream_calls(shared_upstream, path) == 4


def test_explicit_freshness_only_without_a_ttl(gateway, shared_upstream) -> None:
    bare = made("explicit")
    get(gateway, bare)
    assert get(gateway, bare).header("x-cache") == "MISS"
    assert upstream_calls(shared_upstream, bare) == 2
    fresh = made("explicit", h=["cache-control:max-age=120"])
    get(gateway, fresh)
    hit = get(gateway, fresh)
    assert hit.header("x-cache") == "HIT"
    assert 115 <= int(hit.header("cache-status").rpartition("ttl=")[2]) <= 120
    expired = made("c", h=["cache-control:max-age=0"])  # explicit: beats the route's ttl
    get(gateway, expired)
    assert get(gateway, expired).header("x-cache") == "MISS"
    aged = made("c", h=["cache-control:max-age=100", "age:90"])
    get(gateway, aged)
    older = get(gateway, aged)
    assert older.header("x-cache") == "HIT" and int(older.header("age")) >= 90


def test_vary_selects_the_stored_response(gateway, shared_upstream) -> None:
    path = made(h=["vary:Accept-Language"])
    assert get(gateway, path, {"Accept-Language": "en"}).header("x-cache") == "MISS"
    assert (
        get(gateway, path, {"Accept-Language": "de"}).header("cache-status")
        == "apigate; fwd=vary-miss; stored"
    )
    assert get(gateway, path, {"Accept-Language": "en"}).header("x-cache") == "HIT"
    assert get(gateway, path, {"Accept-Language": "de"}).header("x-cache") == "HIT"
    assert get(gateway, path).header("x-cache") == "MISS"
    assert upstream_calls(shared_upstream, path) == 3


def test_conditional_requests_get_304_from_the_store(gateway, shared_upstream) -> None:
    modified = "Sat, 01 Jan 2022 00:00:00 GMT"
    path = made(h=['etag:"abc"', f"last-modified:{modified}", "cache-control:max-age=60"])
    get(gateway, path)
    with RawConnection(gateway.port) as conn:
        response = conn.exchange("GET", path, {"If-None-Match": 'W/"abc"'})
        assert response.status == 304 and response.body == b""
        assert response.header("etag") == '"abc"' and response.header("content-length") is None
        assert response.header("cache-control") == "max-age=60" and response.header("x-cache") == "HIT"
        # The connection goes on: the 304 had no body.
        assert conn.exchange("GET", path, {"If-Modified-Since": modified}).status == 304
        assert conn.exchange("GET", path, {"If-None-Match": '"other"'}).status == 200
        assert (
            conn.exchange("GET", path, {"If-Modified-Since": "Fri, 31 Dec 2021 00:00:00 GMT"}).status == 200
        )
    assert upstream_calls(shared_upstream, path) == 1


def test_unsafe_methods_invalidate_the_uri_and_its_locations(gateway, shared_upstream) -> None:
    path = made()
    other = made()
    get(gateway, path)
    get(gateway, other)
    assert get(gateway, path).header("x-cache") == "HIT"
    failed = get(gateway, path + "&status=500", method="POST")  # another URI: nothing to invalidate
    assert failed.status == 500
    assert get(gateway, path).header("x-cache") == "HIT"
    other_path = other.partition("?")
    posted = get(
        gateway,
        made(status=201, h=[f"location:{other}", f"content-location:http://gateway.test{path}"]),
        method="POST",
    )
    assert posted.status == 201
    assert get(gateway, path).header("x-cache") == "MISS"
    assert get(gateway, other_path[0] + "?" + other_path[2]).header("x-cache") == "MISS"
    deleted = get(gateway, path, method="DELETE")
    assert deleted.status == 200
    assert get(gateway, path).header("x-cache") == "MISS"


def test_one_hundred_concurrent_misses_make_one_upstream_request(gateway, shared_upstream) -> None:
    path = f"/slow/0?tag={next(_tags)}"
    shared_upstream.hold()
    try:
        with ThreadPoolExecutor(max_workers=100) as pool:
            barrier = threading.Barrier(100)

            def one() -> RawResponse:
                with RawConnection(gateway.port, timeout=30) as conn:
                    barrier.wait()
                    return conn.exchange("GET", path)

            futures = [pool.submit(one) for _ in range(100)]
            wait_until(lambda: upstream_calls(shared_upstream, path) >= 1)
            shared_upstream.release()
            responses = [future.result(timeout=30) for future in futures]
    finally:
        shared_upstream.release()
        shared_upstream.gate = None
    assert all(response.status == 200 and response.body == b'{"slow":true}' for response in responses)
    outcomes = [response.header("x-cache") for response in responses]
    assert outcomes.count("MISS") == 1 and outcomes.count("HIT") == 99
    assert upstream_calls(shared_upstream, path) == 1


def test_waiting_misses_go_upstream_when_the_answer_is_not_stored(gateway, shared_upstream) -> None:
    path = made(h=["cache-control:private"])
    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(lambda _: get(gateway, path), range(10)))
    assert all(response.status == 200 for response in responses)
    assert upstream_calls(shared_upstream, path) == 10


def test_a_body_over_max_entry_size_is_streamed_and_not_stored(gateway, shared_upstream) -> None:
    size = 5 << 20
    path = made("limited", size=size, framing="chunked")
    for _ in range(2):
        response = get(gateway, path)
        assert response.status == 200 and len(response.body) == size
        assert response.body == made_body(size)
        assert response.header("x-cache") == "MISS"
    assert upstream_calls(shared_upstream, path) == 2
    known = made("limited", size=size)
    assert get(gateway, known).header("cache-status") == "apigate; fwd=uri-miss"
    small = made("limited", size=1000, framing="chunked")
    get(gateway, small)
    assert get(gateway, small).header("x-cache") == "HIT"


def test_entries_are_kept_per_consumer_when_keyed_by_consumer(gateway, shared_upstream) -> None:
    path = made("per-consumer", h=["cache-control:public"])
    assert get(gateway, path, {"X-API-Key": KEY}).header("x-cache") == "MISS"
    assert get(gateway, path, {"X-API-Key": OTHER_KEY}).header("x-cache") == "MISS"
    assert get(gateway, path, {"X-API-Key": KEY}).header("x-cache") == "HIT"
    assert get(gateway, path).status == 401  # authentication still runs before the store answers
    assert upstream_calls(shared_upstream, path) == 2


def test_hits_are_compressed_per_client_from_the_stored_identity_body(gateway, shared_upstream) -> None:
    path = made("compressed", size=20_000)
    first = get(gateway, path, {"Accept-Encoding": "gzip"})
    assert first.header("x-cache") == "MISS" and first.header("content-encoding") == "gzip"
    assert gzip.decompress(first.body) == made_body(20_000)
    hit = get(gateway, path, {"Accept-Encoding": "gzip"})
    assert hit.header("x-cache") == "HIT" and hit.header("content-encoding") == "gzip"
    assert gzip.decompress(hit.body) == made_body(20_000)
    plain = get(gateway, path)
    assert plain.header("x-cache") == "HIT" and plain.header("content-encoding") is None
    assert plain.body == made_body(20_000)
    assert upstream_calls(shared_upstream, path) == 1


def test_no_content_and_not_found_are_stored(gateway, shared_upstream) -> None:
    for status in (204, 404):
        path = made(status=status)
        get(gateway, path)
        again = get(gateway, path)
        assert again.status == status and again.header("x-cache") == "HIT"
        assert upstream_calls(shared_upstream, path) == 1


HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cache_control_value=HEADER_TEXT, vary=HEADER_TEXT, etag=HEADER_TEXT, condition=HEADER_TEXT)
def test_arbitrary_cache_headers_never_break_the_gateway(
    gateway, cache_control_value, vary, etag, condition
) -> None:
    path = made(h=[f"cache-control:{cache_control_value}", f"vary:{vary}", f"etag:{etag}"])
    for headers in (
        {"Cache-Control": cache_control_value},
        {"If-None-Match": condition, "If-Modified-Since": condition},
    ):
        response = get(gateway, path, {k: v.strip() for k, v in headers.items()})
        assert response.status < 500


def test_hits_are_counted_in_stats_and_the_access_log(start_gateway, upstream, tmp_path) -> None:
    log_path = tmp_path / "access.log"
    gateway = start_gateway(
        {
            "access_log": {"output": str(log_path), "flush_interval": "50ms"},
            "endpoints": {"token": "stats-token"},
            "routes": [{"path": "/api/*", "target": upstream.url, "cache": "60s"}],
        }
    )
    outcomes = {}
    for rid, headers in (("rid-miss", {}), ("rid-hit", {}), ("rid-bypass", {"Cache-Control": "no-store"})):
        response = get(gateway, "/api/echo", {"X-Request-ID": rid, **headers})
        outcomes[rid] = response.header("x-cache")
    assert outcomes == {"rid-miss": "MISS", "rid-hit": "HIT", "rid-bypass": "BYPASS"}

    def logged() -> dict[str, object] | None:
        text = log_path.read_bytes() if log_path.exists() else b""
        lines = {line["request_id"]: line["cache"] for line in map(orjson.loads, text.splitlines())}
        return lines if len(lines) >= 3 else None

    assert wait_until(logged) == {"rid-miss": "miss", "rid-hit": "hit", "rid-bypass": "bypass"}
    stats = get(gateway, "/stats", {"Authorization": "Bearer stats-token"}).json()
    assert stats["requests_cached"] == 1 and stats["cache_size"] == 1
