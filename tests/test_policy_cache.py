"""The `cache` policy: the freshness rules (RFC 9111) with explicit times, the store (bounds, LRU,
Vary, purge, collapsed misses), and a real gateway in front of a real upstream that counts what
reaches it: hits, misses, what is never stored, Vary, 304s, HEAD from GET, invalidation by unsafe
methods, concurrent misses collapsed into one upstream request, a large body passed and not
stored, consumers kept apart, and arbitrary cache headers. Stale responses (RFC 9111 §4.2.4,
§4.3; RFC 5861) run on a gateway in this process whose store and upstream share the test's
clock: revalidation by ETag and by Last-Modified, stale-while-revalidate with one refresh in the
background however many requests come, stale-if-error with an upstream that is down or answers
503, must-revalidate, max-stale and only-if-cached."""

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
from apigate.policies.cache.stale import REFRESHES, max_stale, stale_window, validators
from apigate.policies.cache.store import CacheStore, Entry, normalised_query, vary_values
from tests.support.errors_helpers import wait_until
from tests.support.exchanges import request_exchange
from tests.support.inprocess import InProcessGateway
from tests.support.proxy_http import RawConnection, RawResponse, running_gateway
from tests.support.resource_upstream import Resource, ResourceUpstream
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
    assert CachePolicy.expand_shorthand("60s") == {"ttl": 60.0, "key_by": ["consumer", "tenant"]}
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


def test_requests_with_authorization_are_stored_per_identified_consumer(gateway, shared_upstream) -> None:
    # key-auth identifies the caller and the route keys by consumer: the entry is the consumer's
    # alone, so a response to a request with Authorization may be kept for it (RFC 9111 §3.5
    # guards responses shared between callers).
    path = made("per-consumer")
    bearer = {"Authorization": "Bearer upstream-token"}
    assert get(gateway, path, {"X-API-Key": KEY, **bearer}).header("x-cache") == "MISS"
    assert get(gateway, path, {"X-API-Key": KEY, **bearer}).header("x-cache") == "HIT"
    assert get(gateway, path, {"X-API-Key": OTHER_KEY, **bearer}).header("x-cache") == "MISS"
    assert upstream_calls(shared_upstream, path) == 2


# -- stale responses: the rules ---------------------------------------------------------------------
def test_what_allows_a_stale_response_to_be_served() -> None:
    def cc(value: bytes) -> dict[bytes, bytes | None]:
        return rules.cache_control([(b"cache-control", value)])

    swr, sie = b"stale-while-revalidate", b"stale-if-error"
    assert stale_window(swr, cc(b"max-age=5, stale-while-revalidate=30"), {}, None) == 30
    assert stale_window(swr, cc(b"max-age=5"), {}, 10.0) == 10  # the route's default
    assert stale_window(swr, cc(b"max-age=5"), {}, None) is None
    assert stale_window(swr, cc(b"max-age=5, stale-while-revalidate=soon"), {}, 10.0) is None
    # The client's own stale-if-error wins over the response's, both ways.
    assert stale_window(sie, cc(b"max-age=5, stale-if-error=60"), cc(b"stale-if-error=5"), None) == 5
    assert stale_window(sie, cc(b"max-age=5"), cc(b"stale-if-error=90"), None) == 90
    # must-revalidate and proxy-revalidate forbid it; s-maxage lets only the response's own through.
    for forbidding in (b"must-revalidate", b"proxy-revalidate"):
        assert (
            stale_window(sie, cc(b"stale-if-error=60, " + forbidding), cc(b"stale-if-error=9"), 9.0) is None
        )
    assert stale_window(sie, cc(b"s-maxage=5, stale-if-error=60"), cc(b"stale-if-error=9"), 9.0) == 60
    assert stale_window(sie, cc(b"s-maxage=5"), cc(b"stale-if-error=9"), 9.0) is None
    assert max_stale(cc(b"max-stale"), cc(b"max-age=5")) == float("inf")
    assert max_stale(cc(b"max-stale=7"), cc(b"max-age=5")) == 7
    assert max_stale(cc(b"max-stale=7"), cc(b"max-age=5, must-revalidate")) is None
    assert max_stale(cc(b"max-stale=7"), cc(b"s-maxage=5")) is None
    assert max_stale({}, cc(b"max-age=5")) is None
    stored = [(b"etag", b'W/"v1"'), (b"last-modified", rules.format_http_date(T0))]
    assert validators(stored) == [
        (b"if-none-match", b'W/"v1"'),
        (b"if-modified-since", rules.format_http_date(T0)),
    ]
    assert validators([(b"content-type", b"text/plain")]) == []


def test_a_client_that_accepts_stale_gets_it_from_the_store() -> None:
    clock = Clock()
    policy = cached_policy(clock)
    through(policy, "/m", [(b"cache-control", b"max-age=10")])
    clock.now = T0 + 25

    def asked(value: bytes) -> object:
        exchange = request_exchange([(b"host", b"api.test"), (b"cache-control", value)], path="/m")
        return policy.on_request(exchange)

    stale = asked(b"max-stale=20")
    assert isinstance(stale, Reply) and stale.status == 200 and stale.body == b"body"
    assert (b"x-cache", b"STALE") in stale.headers
    assert (b"cache-status", b"apigate; hit; ttl=-15") in stale.headers
    assert isinstance(asked(b"max-stale"), Reply)
    assert asked(b"max-stale=10") is None  # 15 s stale is more than it accepts
    assert asked(b"max-stale=20, max-age=20") is None  # 25 s old is older than it wants
    assert asked(b"max-stale=20, min-fresh=1") is None
    only = asked(b"only-if-cached")  # stale, and not accepted: 504 instead of going upstream
    assert isinstance(only, Reply) and only.status == 504 and only.reason == "not_cached"
    assert isinstance(asked(b"only-if-cached, max-stale=20"), Reply)
    missing = request_exchange([(b"host", b"api.test"), (b"cache-control", b"only-if-cached")], path="/none")
    nothing = policy.on_request(missing)
    assert isinstance(nothing, Reply) and nothing.status == 504


# -- stale responses through a gateway in this process, on the test's clock ------------------------
@pytest.fixture
def origin() -> object:
    clock = Clock()
    server = ResourceUpstream(clock=clock).start()
    server.test_clock = clock  # type: ignore[attr-defined]
    yield server
    server.close()


@pytest.fixture
def stale_gateway(origin):
    """A gateway in this process in front of ``origin``, whose cache routes share one store on
    the origin's clock: /r (the response's own directives), /swr (stale-while-revalidate 30s by
    default), /sie (stale-if-error 60s by default)."""

    def route(path: str, **cache: object) -> dict:
        return {"path": f"/{path}/*", "target": origin.url, "policies": {"cache": cache}}

    config = {
        "routes": [route("r"), route("swr", stale_while_revalidate="30s"), route("sie", stale_if_error="60s")]
    }
    store = CacheStore(1 << 20, 100, clock=origin.test_clock)
    with InProcessGateway(orjson.dumps(config).decode()) as running:
        for index in range(3):
            running.policy(index, "cache").store = store
        yield running
    assert not REFRESHES.running  # every refresh ended


def fetch(gateway, path: str, headers: dict[str, str] | None = None) -> RawResponse:
    with RawConnection(gateway.port) as conn:
        return conn.exchange("GET", path, headers)


def test_a_stale_response_is_revalidated_with_its_etag(stale_gateway, origin) -> None:
    origin.resources["/r/etag"] = Resource(b"version 1", etag='"v1"', cache_control="max-age=10")
    first = fetch(stale_gateway, "/r/etag")
    assert first.status == 200 and first.header("x-cache") == "MISS"
    origin.test_clock.now += 20
    again = fetch(stale_gateway, "/r/etag")
    # The client sent no conditions: it gets the stored response, which the 304 freshened.
    assert again.status == 200 and again.body == b"version 1"
    assert again.header("x-cache") == "REVALIDATED" and again.header("etag") == '"v1"'
    assert again.header("cache-status") == "apigate; fwd=stale; fwd-status=304; stored"
    assert again.header("content-length") == "9" and again.header("age") == "0"
    calls = origin.calls("/r/etag")
    assert [call.status for call in calls] == [200, 304]
    assert calls[1].headers.get("if-none-match") == '"v1"' and "if-none-match" not in calls[0].headers
    origin.test_clock.now += 5
    hit = fetch(stale_gateway, "/r/etag")
    assert hit.header("x-cache") == "HIT" and hit.header("age") == "5" and len(origin.calls("/r/etag")) == 2


def test_a_stale_response_is_revalidated_with_its_last_modified(stale_gateway, origin) -> None:
    modified = T0 - 3600
    origin.resources["/r/dated"] = Resource(b"dated", last_modified=modified, cache_control="max-age=10")
    fetch(stale_gateway, "/r/dated")
    origin.test_clock.now += 11
    with RawConnection(stale_gateway.port) as conn:
        again = conn.exchange("GET", "/r/dated")
        assert again.status == 200 and again.body == b"dated" and again.header("x-cache") == "REVALIDATED"
        # A client's own condition, on the freshened response: the store answers it.
        assert (
            conn.exchange(
                "GET", "/r/dated", {"If-Modified-Since": rules.format_http_date(modified).decode()}
            ).status
            == 304
        )
    calls = origin.calls("/r/dated")
    assert len(calls) == 2 and calls[1].status == 304
    assert calls[1].headers.get("if-modified-since") == rules.format_http_date(modified).decode()
    assert "if-none-match" not in calls[1].headers


def test_a_changed_resource_replaces_the_stale_entry_and_a_client_condition_goes_as_sent(
    stale_gateway, origin
) -> None:
    resource = origin.resources["/r/changing"] = Resource(b"one", etag='"1"', cache_control="max-age=10")
    fetch(stale_gateway, "/r/changing")
    origin.test_clock.now += 20
    resource.body, resource.etag = b"two", '"2"'
    changed = fetch(stale_gateway, "/r/changing")
    assert changed.body == b"two" and changed.header("x-cache") == "MISS"
    assert changed.header("cache-status") == "apigate; fwd=stale; stored"
    assert fetch(stale_gateway, "/r/changing").header("x-cache") == "HIT"
    origin.test_clock.now += 20
    # The client's own conditions go upstream as they are; its 304 freshens the entry too.
    mine = fetch(stale_gateway, "/r/changing", {"If-None-Match": '"2"'})
    assert mine.status == 304 and mine.header("x-cache") == "REVALIDATED"
    assert origin.calls("/r/changing")[-1].headers["if-none-match"] == '"2"'
    assert fetch(stale_gateway, "/r/changing").header("x-cache") == "HIT"
    assert len(origin.calls("/r/changing")) == 3


def test_stale_while_revalidate_serves_stale_at_once_and_refreshes_once(stale_gateway, origin) -> None:
    resource = origin.resources["/r/swr"] = Resource(
        b"old", etag='"old"', cache_control="max-age=10, stale-while-revalidate=30"
    )
    fetch(stale_gateway, "/r/swr")
    origin.test_clock.now += 15
    resource.body, resource.etag = b"new", '"new"'
    origin.mode = "hold"  # the refresh waits upstream while the requests come
    try:
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(lambda _: fetch(stale_gateway, "/r/swr"), range(20)))
        assert all(a.status == 200 and a.body == b"old" and a.header("x-cache") == "STALE" for a in answers)
        assert answers[0].header("cache-status") == "apigate; hit; ttl=-5; detail=stale-while-revalidate"
        assert answers[0].header("age") == "15"
        refresh = wait_until(lambda: origin.calls("/r/swr")[1:] or None)
    finally:
        origin.release()
    assert refresh[0].headers.get("if-none-match") == '"old"'
    # The refresh's 200 replaced the entry: fresh again, without another upstream call.
    fresh = wait_until(lambda: (found := fetch(stale_gateway, "/r/swr")).body == b"new" and found)
    assert fresh.header("x-cache") == "HIT"
    assert [call.status for call in origin.calls("/r/swr")] == [200, 200]
    wait_until(lambda: not REFRESHES.running)
    # Past the window the stale entry is not served: the request revalidates it itself.
    origin.test_clock.now += 45
    late = fetch(stale_gateway, "/r/swr")
    assert late.header("x-cache") == "REVALIDATED" and late.body == b"new"
    assert len(origin.calls("/r/swr")) == 3


def test_a_refresh_answered_304_freshens_the_entry(stale_gateway, origin) -> None:
    # The route's default window: the response says nothing of stale-while-revalidate.
    origin.resources["/swr/same"] = Resource(b"same", etag='"s"', cache_control="max-age=10")
    fetch(stale_gateway, "/swr/same")
    origin.test_clock.now += 39  # 29 s stale: within the route's 30 s
    stale = fetch(stale_gateway, "/swr/same")
    assert stale.header("x-cache") == "STALE" and stale.body == b"same"
    wait_until(lambda: len(origin.calls("/swr/same")) == 2 and not REFRESHES.running)
    assert origin.calls("/swr/same")[1].status == 304
    hit = fetch(stale_gateway, "/swr/same")
    assert hit.header("x-cache") == "HIT" and hit.header("age") == "0" and hit.body == b"same"
    origin.resources["/r/plain"] = Resource(b"plain", etag='"p"', cache_control="max-age=10")
    fetch(stale_gateway, "/r/plain")
    origin.test_clock.now += 11
    # Without the route's default or the response's directive, a stale entry is revalidated.
    assert fetch(stale_gateway, "/r/plain").header("x-cache") == "REVALIDATED"


def test_stale_if_error_serves_the_stale_entry_while_the_upstream_is_down(stale_gateway, origin) -> None:
    origin.resources["/r/down"] = Resource(b"kept", etag='"k"', cache_control="max-age=10, stale-if-error=60")
    fetch(stale_gateway, "/r/down")
    origin.test_clock.now += 20
    origin.stop()  # connections are refused
    try:
        served = fetch(stale_gateway, "/r/down")
        assert served.status == 200 and served.body == b"kept" and served.header("x-cache") == "STALE"
        assert served.header("cache-status") == "apigate; fwd=stale; ttl=-10; detail=stale-if-error"
        assert served.header("age") == "20"
        origin.test_clock.now += 60  # 70 s stale: past the window
        failed = fetch(stale_gateway, "/r/down")
        assert failed.status == 502 and failed.json()["reason"] == "connect_failed"
        assert failed.header("x-cache") == "MISS"
    finally:
        origin.start()
    back = fetch(stale_gateway, "/r/down")
    assert back.status == 200 and back.header("x-cache") == "REVALIDATED"


def test_stale_if_error_serves_the_stale_entry_when_the_upstream_answers_503(stale_gateway, origin) -> None:
    origin.resources["/sie/busy"] = Resource(b"busy", etag='"b"', cache_control="max-age=10")
    origin.resources["/r/busy"] = Resource(b"busy", etag='"b"', cache_control="max-age=10")
    fetch(stale_gateway, "/sie/busy")
    fetch(stale_gateway, "/r/busy")
    origin.test_clock.now += 30
    origin.mode = "status:503"
    served = fetch(stale_gateway, "/sie/busy")  # the route's default of 60 s
    assert served.status == 200 and served.body == b"busy" and served.header("x-cache") == "STALE"
    assert (
        served.header("cache-status") == "apigate; fwd=stale; fwd-status=503; ttl=-20; detail=stale-if-error"
    )
    # Without a default, the client's own stale-if-error (RFC 5861 §4) allows it; else the 503 goes.
    assert fetch(stale_gateway, "/r/busy").status == 503
    asked = fetch(stale_gateway, "/r/busy", {"Cache-Control": "stale-if-error=30"})
    assert asked.status == 200 and asked.header("x-cache") == "STALE"
    assert fetch(stale_gateway, "/r/busy", {"Cache-Control": "stale-if-error=10"}).status == 503
    assert [call.status for call in origin.calls("/sie/busy")] == [200, 503]


def test_must_revalidate_forbids_stale_answers(stale_gateway, origin) -> None:
    origin.resources["/sie/strict"] = Resource(
        b"strict", etag='"s"', cache_control="max-age=10, must-revalidate, stale-if-error=60"
    )
    fetch(stale_gateway, "/sie/strict")
    origin.test_clock.now += 20
    origin.mode = "status:503"
    assert fetch(stale_gateway, "/sie/strict").status == 503  # the upstream's own answer
    origin.stop()
    try:
        refused = fetch(stale_gateway, "/sie/strict", {"Cache-Control": "max-stale=60"})
        assert refused.status == 504 and refused.json()["reason"] == "connect_failed"
        assert refused.header("cache-status") == "apigate; fwd=stale; detail=must-revalidate"
        assert b"strict" not in refused.body
    finally:
        origin.start()
    origin.mode = "ok"
    assert fetch(stale_gateway, "/sie/strict").header("x-cache") == "REVALIDATED"


def test_identified_callers_get_entries_of_their_own() -> None:
    clock = Clock()
    policy = cached_policy(clock, ttl="60s", key_by=["consumer", "tenant"])

    def asking(consumer: str | None, tenant: str | None = None, authorization: bool = True) -> object:
        headers = [(b"host", b"api.test")] + ([(b"authorization", b"Bearer t")] if authorization else [])
        exchange = request_exchange(headers, path="/mine")
        exchange.consumer, exchange.tenant = consumer, tenant
        return exchange

    def through_as(exchange) -> object:  # type: ignore[no-untyped-def]
        answer = policy.on_request(exchange)
        if answer is not None:
            return answer
        exchange.t_first_byte = 1.0
        exchange.response_status = 200
        exchange.response_headers = [(b"content-type", b"text/plain"), (b"content-length", b"4")]
        policy.on_response(exchange)
        capture = policy.on_response_body(exchange)
        if capture is not None:
            capture.feed(b"body")
            capture.end()
        policy.on_log(exchange)
        return exchange.response_headers

    assert not isinstance(through_as(asking("alice")), Reply)
    assert isinstance(through_as(asking("alice")), Reply)  # stored for alice, with Authorization
    assert not isinstance(through_as(asking("bob")), Reply)
    # Ids holding the separator do not reach another consumer's partition in another tenant.
    assert not isinstance(through_as(asking("a\x00b", "c")), Reply)
    assert not isinstance(through_as(asking("a", "b\x00c")), Reply)
    # Nobody identified: Authorization keeps RFC 9111 §3.5's rule, nothing is stored.
    assert not isinstance(through_as(asking(None)), Reply)
    assert not isinstance(through_as(asking(None)), Reply)
