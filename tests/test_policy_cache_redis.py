"""The `cache` policy with `store: redis`, and purges: the entry format (nothing but our own entry is
ever served from what Redis holds), the policy's hooks in process on a real Redis with the store's
clock injected (Vary, key_by, TTLs in Redis, what is too large, the hot layer, Redis going away),
purge notices, and real gateways: gateway A with two workers and gateway B on one Redis, `apigate
cache purge` run as a command reaching all of them within a second, Redis stopped under load, and
a node with two workers and the memory store purged through its admin listener."""

from __future__ import annotations

import contextlib
import inspect
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from apigate.config.loader import ConfigError, load_config
from apigate.engine.replies import Reply
from apigate.policies.cache import CachePolicy
from apigate.policies.cache.purge import (
    PurgeError,
    PurgeListener,
    parse_notice,
    purge,
    purge_everything,
    purge_prefix,
    purge_route,
    purge_url,
)
from apigate.policies.cache.redis_store import RedisLayer, decode_entry, encode_entry
from apigate.policies.cache.store import Entry
from apigate.state import StateUnavailable, open_state
from apigate.state.redis import RedisState
from tests.support.errors_helpers import apigate_cmd, clean_env
from tests.support.gateway import GatewayProcess, free_port
from tests.support.proxy_http import RawConnection, RawResponse
from tests.support.redis import RedisServer
from tests.support.state import Run, until
from tests.support.upstream import UpstreamServer, made_body

T0 = 1_700_000_000.0
KEY = "partner-declared-key-0123456789abcdef"
OTHER_KEY = "other-declared-key-0123456789abcdef"
# A purge must reach every worker of every node within this (measured from the command's end).
PURGE_REACH = 1.0


# -- the entry as bytes ------------------------------------------------------------------------------
def an_entry(**changes: Any) -> Entry:
    fields: dict[str, Any] = {
        "uri": ("api.test", "/p", b"a=1&b=2"),
        "partition": "alice\x00",
        "route": "r",
        "vary": (b"accept",),
        "varies": (b"text/html",),
        "status": 200,
        "headers": [(b"content-type", b"text/plain"), (b"etag", b'"v1"'), (b"x-\xe9", b"\xff")],
        "body": bytes(range(256)) * 4,
        "response_time": T0,
        "initial_age": 3.0,
        "lifetime": 60.0,
    }
    fields.update(changes)
    return Entry(**fields)


def test_an_entry_survives_the_round_trip_through_bytes() -> None:
    entry = an_entry()
    back = decode_entry(encode_entry(entry))
    assert back is not None
    assert back.id == entry.id and back.route == "r" and back.status == 200
    assert back.headers == entry.headers and back.body == entry.body
    assert (back.response_time, back.initial_age, back.lifetime) == (T0, 3.0, 60.0)
    assert back.content_type == b"text/plain" and back.reply_headers == entry.reply_headers
    unvaried = decode_entry(encode_entry(an_entry(vary=(), varies=(), partition="", body=b"")))
    assert unvaried is not None and unvaried.vary == () and unvaried.body == b""


def test_anything_but_an_entry_of_ours_is_no_entry() -> None:
    good = encode_entry(an_entry())
    assert decode_entry(b"") is None
    assert decode_entry(b"\x80\x04\x95pickle") is None
    assert decode_entry(b"AGC2" + good[4:]) is None  # another format version
    assert decode_entry(good[:20]) is None  # cut short
    assert decode_entry(good[:4] + (10**6).to_bytes(4, "big") + good[8:]) is None
    # A field that would split the response (written into Redis by someone else) is refused.
    split = encode_entry(an_entry(headers=[(b"x-a", b"1\r\nset-cookie: a=b")]))
    assert decode_entry(split) is None
    head = orjson.loads(good[8 : 8 + int.from_bytes(good[4:8], "big")])
    for index, wrong in ((7, "200"), (7, 99), (7, True), (9, "now"), (6, [1]), (8, [["a"]])):
        changed = list(head)
        changed[index] = wrong
        blob = orjson.dumps(changed)
        assert decode_entry(b"AGC1" + len(blob).to_bytes(4, "big") + blob) is None, (index, wrong)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_break_decoding(blob: bytes) -> None:
    found = decode_entry(b"AGC1" + blob)
    assert found is None or isinstance(found, Entry)


# -- purges as values --------------------------------------------------------------------------------
def test_purges_are_parsed_strictly() -> None:
    assert parse_notice({"all": True}) == purge_everything()
    assert parse_notice({"route": "r"}) == purge_route("r")
    assert parse_notice({"prefix": "/a/", "host": "API.test"}) == purge_prefix("/a/", "api.test")
    url = purge_url("http://API.test:8080/x/../p?b=2&a=1")
    assert url.uri == ("api.test:8080", "/p", b"a=1&b=2")
    assert parse_notice(url.notice()) == url
    assert parse_notice({"url": "https://api.test/p?a=1&b=2"}).uri == ("api.test", "/p", b"a=1&b=2")
    for bad in (
        {},
        {"all": False},
        {"all": True, "route": "r"},
        {"route": 5},
        {"route": ""},
        {"route": "x" * 5000},
        {"prefix": "p"},
        {"prefix": "/p", "host": 1},
        {"url": "ftp://h/p"},
        {"url": "http:///p"},
        {"url": "http://user:pw@h/p"},
        {"url": ["h", "/p"]},
        {"url": "http://h/%00"},
        {"route": "a\nb"},
        [],
        "all",
    ):
        with pytest.raises(PurgeError):
            parse_notice(bad)


def test_a_notice_that_is_not_understood_is_ignored() -> None:
    listener = PurgeListener()
    for message in (b"not json", b'{"route": 1}', b"[" * 20_000):
        listener.received_notice(message)  # logged once, never raised
    assert listener.received == 3


# -- the policy's hooks in process, on a real Redis ------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Services:
    """What the policy reaches: the state backend (here a real Redis), nothing else."""

    consumers = None
    webhooks = None

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_at(self, url: str) -> Any:
        return None


class Rig:
    """A policy over a layer of its own on a real Redis, times from ``clock`` (the store's)
    and ``ticks`` (the hot layer's)."""

    def __init__(self, state: RedisState, local_ttl: float = 60.0, **config: Any) -> None:
        self.state = state
        self.clock = Clock()
        self.ticks = Clock()
        self.ticks.now = 0.0
        services = Services(state)
        full = {"collapse_wait": 0, "store": "redis", "local_ttl": local_ttl, **config}
        self.policy = CachePolicy(CachePolicy.Config.model_validate(full), route="r")
        self.layer = RedisLayer(clock=self.clock, monotonic=self.ticks)
        self.layer.configure(services, "r", local_ttl, 1 << 20)  # type: ignore[arg-type]
        self.policy.store = self.layer

    def fresh_worker(self) -> Rig:
        """Another worker (or node) on the same Redis: a hot layer of its own, the same clocks."""
        other = Rig.__new__(Rig)
        other.state, other.clock, other.ticks = self.state, self.clock, self.ticks
        other.policy = CachePolicy(self.policy.config, route="r")
        other.layer = RedisLayer(clock=self.clock, monotonic=self.ticks)
        other.layer.configure(Services(self.state), "r", self.policy.config.local_ttl, 1 << 20)  # type: ignore[arg-type]
        other.policy.store = other.layer
        return other

    async def get(
        self,
        path: str,
        response_headers: list[tuple[bytes, bytes]] | None = None,
        request_headers: list[tuple[bytes, bytes]] | None = None,
        consumer: str | None = None,
        body: bytes = b"body",
    ) -> Reply | list[tuple[bytes, bytes]]:
        """One GET through the hooks: the store's answer, or the head the client got after the
        upstream answered 200 with ``response_headers`` and ``body``; the writes to Redis are
        answered before it returns."""
        from tests.support.exchanges import request_exchange

        path, _, query = path.partition("?")
        exchange = request_exchange(
            [(b"host", b"api.test"), *(request_headers or [])], path=path, query=query.encode()
        )
        exchange.consumer = consumer
        answer = self.policy.on_request(exchange)
        if inspect.isawaitable(answer):
            answer = await answer
        if answer is not None:
            return answer
        exchange.t_first_byte = 1.0
        exchange.response_status = 200
        exchange.response_headers = [
            *(response_headers or []),
            (b"content-type", b"text/plain"),
            (b"content-length", b"%d" % len(body)),
        ]
        self.policy.on_response(exchange)
        capture = self.policy.on_response_body(exchange)
        if capture is not None:
            assert capture.feed(body) == body and capture.end() == b""
        self.policy.on_log(exchange)
        with contextlib.suppress(StateUnavailable):  # Redis is down in some tests
            await self.state.incr("test-barrier")  # queued after the writes: they are answered
        return exchange.response_headers


def header(answer: Any, name: bytes) -> bytes | None:
    pairs = answer.headers if isinstance(answer, Reply) else answer
    return next((value for key, value in pairs if key == name), None)


@pytest.fixture
def redis_state(redis_url: str, run: Run) -> Any:
    state = open_state(redis_url)
    run(state.open())
    yield state
    run(state.close())


def test_a_response_stored_by_one_worker_is_a_hit_in_another(redis_state: RedisState, run: Run) -> None:
    async def scenario() -> None:
        first = Rig(redis_state, ttl="60s")
        missed = await first.get("/p", [(b"etag", b'"v1"')])
        assert header(missed, b"cache-status") == b"apigate; fwd=uri-miss; stored"
        other = first.fresh_worker()
        first.clock.now = T0 + 5
        hit = await other.get("/p")
        assert isinstance(hit, Reply) and hit.body == b"body" and header(hit, b"age") == b"5"
        assert header(hit, b"etag") == b'"v1"' and hit.content_type == b"text/plain"
        # Redis keeps it for its freshness (60 s) and no longer.
        client = redis.Redis.from_url(redis_state.url)
        entry_keys = [key for key in client.keys("apigate:{*}:ce:*")]
        assert len(entry_keys) == 1 and 59_000 < client.pttl(entry_keys[0]) <= 60_000
        client.close()

    run(scenario())


def test_redis_keeps_an_entry_for_the_staleness_its_response_allows(
    redis_state: RedisState, run: Run
) -> None:
    async def scenario() -> None:
        rig = Rig(redis_state)
        await rig.get("/s", [(b"cache-control", b"max-age=30, stale-if-error=600, stale-while-revalidate=5")])
        client = redis.Redis.from_url(redis_state.url)
        (key,) = client.keys("apigate:{*}:ce:*")
        assert 629_000 < client.pttl(key) <= 630_000
        client.close()

    run(scenario())


def test_the_hot_layer_saves_redis_reads_until_local_ttl(redis_state: RedisState, run: Run) -> None:
    async def scenario() -> None:
        rig = Rig(redis_state, local_ttl=1.0, ttl="60s")
        await rig.get("/hot")
        reader = rig.fresh_worker()
        assert isinstance(await reader.get("/hot"), Reply)  # read from Redis once
        sent = redis_state.commands_sent
        for _ in range(50):
            assert isinstance(await reader.get("/hot"), Reply)
        assert redis_state.commands_sent == sent  # answered from the hot copy: nothing sent
        # Deleted in Redis behind the layer's back: served from the hot copy until local_ttl.
        client = redis.Redis.from_url(redis_state.url)
        client.delete(*client.keys("apigate:{*}:c*"))
        client.close()
        assert isinstance(await reader.get("/hot"), Reply)
        rig.ticks.now = 1.0
        assert not isinstance(await reader.get("/hot"), Reply)
        # Redis had nothing: that news is kept as long, then asked again.
        sent = redis_state.commands_sent
        await rig.get("/nothing-here-yet", [(b"cache-control", b"no-store")])
        await rig.get("/nothing-here-yet", [(b"cache-control", b"no-store")])
        assert redis_state.commands_sent - sent == 3  # one read, two barriers

    run(scenario())


def test_vary_selects_the_variant_across_workers(redis_state: RedisState, run: Run) -> None:
    async def scenario() -> None:
        rig = Rig(redis_state, ttl="60s")
        vary = [(b"vary", b"Accept-Language")]
        english, german = [(b"accept-language", b"en")], [(b"accept-language", b"de")]
        await rig.get("/v", vary, english, body=b"hello")
        await rig.get("/v", vary, german, body=b"hallo")
        other = rig.fresh_worker()
        en = await other.get("/v", request_headers=english)
        de = await other.get("/v", request_headers=german)
        assert isinstance(en, Reply) and en.body == b"hello"
        assert isinstance(de, Reply) and de.body == b"hallo"
        fresh = rig.fresh_worker()
        missed = await fresh.get("/v", vary, [(b"accept-language", b"fr")], body=b"salut")
        assert header(missed, b"cache-status") == b"apigate; fwd=vary-miss; stored"
        # A response with another Vary replaces the variants stored before it.
        await fresh.get("/v", [(b"vary", b"Accept")], [(b"accept", b"text/html")], body=b"html")
        last = rig.fresh_worker()
        assert not isinstance(await last.get("/v", request_headers=english), Reply)

    run(scenario())


def test_entries_keyed_by_consumer_never_reach_another(redis_state: RedisState, run: Run) -> None:
    async def scenario() -> None:
        rig = Rig(redis_state, ttl="60s", key_by=["consumer"])
        await rig.get("/mine", [(b"cache-control", b"public")], consumer="alice", body=b"alice's")
        other = rig.fresh_worker()
        assert not isinstance(await other.get("/mine", consumer="bob", body=b"bob's"), Reply)
        bob = await rig.fresh_worker().get("/mine", consumer="bob")
        alice = await rig.fresh_worker().get("/mine", consumer="alice")
        assert isinstance(bob, Reply) and bob.body == b"bob's"
        assert isinstance(alice, Reply) and alice.body == b"alice's"
        assert not isinstance(await rig.fresh_worker().get("/mine", consumer=None), Reply)

    run(scenario())


def test_an_entry_in_redis_under_another_callers_name_is_not_served(
    redis_state: RedisState, run: Run
) -> None:
    async def scenario() -> None:
        rig = Rig(redis_state, ttl="60s", key_by=["consumer"])
        await rig.get("/forged", consumer="alice", body=b"alice's")
        client = redis.Redis.from_url(redis_state.url)
        (entry_key,) = client.keys("apigate:{*}:ce:*")
        (names_key,) = client.keys("apigate:{*}:cn:*")
        # Bob's keys made to hold Alice's entry (a digest collision, or a hand in Redis).
        bob = rig.fresh_worker()
        missed = await bob.get("/forged", consumer="bob", body=b"bob's")
        assert not isinstance(missed, Reply)
        bob_keys = [k for k in client.keys("apigate:{*}:ce:*") if k != entry_key]
        client.set(bob_keys[0], client.get(entry_key))
        client.set(next(k for k in client.keys("apigate:{*}:cn:*") if k != names_key), client.get(names_key))
        client.close()
        assert not isinstance(await rig.fresh_worker().get("/forged", consumer="bob"), Reply)

    run(scenario())


def test_a_body_over_max_entry_size_is_not_stored_in_redis(redis_state: RedisState, run: Run) -> None:
    async def scenario() -> None:
        rig = Rig(redis_state, ttl="60s", max_entry_size=100)
        big = await rig.get("/big", body=b"x" * 101)
        assert header(big, b"cache-status") == b"apigate; fwd=uri-miss"
        small = await rig.get("/small", body=b"x" * 100)
        assert header(small, b"cache-status") == b"apigate; fwd=uri-miss; stored"
        client = redis.Redis.from_url(redis_state.url)
        assert len(client.keys("apigate:{*}:ce:*")) == 1
        client.close()
        assert not isinstance(await rig.fresh_worker().get("/big"), Reply)

    run(scenario())


def test_purges_reach_redis_and_the_hot_layers(redis_state: RedisState, run: Run) -> None:
    async def scenario() -> None:
        rig = Rig(redis_state, ttl="60s")
        other = rig.fresh_worker()
        listener = PurgeListener()
        listener.listen(redis_state)
        await until(lambda: listener.subscription is not None and listener.subscription.active)
        for path in ("/a/1", "/a/2?x=1", "/b/1"):
            await rig.get(path)
            assert isinstance(await other.get(path), Reply)
        # The notice reaches this process's stores through all_stores(): here, the layers by hand.
        done = await purge(purge_url("http://api.test/a/2?x=1"), redis_state)
        assert (done.redis, done.announced) == (1, True)
        other.layer.purge_key("api.test", "/a/2", b"x=1")
        rig.layer.purge_key("api.test", "/a/2", b"x=1")
        assert not isinstance(await other.get("/a/2?x=1", [(b"cache-control", b"no-store")]), Reply)
        assert isinstance(await other.get("/a/1"), Reply)
        done = await purge(purge_prefix("/a/"), redis_state)
        assert done.redis == 1
        other.layer.purge_prefix("/a/")
        assert not isinstance(await other.get("/a/1", [(b"cache-control", b"no-store")]), Reply)
        assert isinstance(await other.get("/b/1"), Reply)
        done = await purge(purge_route("r"), redis_state)
        assert done.redis == 1
        await rig.get("/c/1")
        assert (await purge(purge_everything(), redis_state)).redis == 1
        client = redis.Redis.from_url(redis_state.url)
        assert [key for key in client.keys("apigate:*") if b"test-barrier" not in key] == []
        client.close()
        await until(lambda: listener.received == 4)  # every purge was announced
        await listener.subscription.close()  # type: ignore[union-attr]

    run(scenario())


def test_a_stopped_redis_is_bypassed_and_found_again(tmp_path: Path, run: Run) -> None:
    server = RedisServer(tmp_path / "redis").start()

    async def scenario() -> None:
        state = open_state(server.url)
        await state.open()
        try:
            rig = Rig(state, local_ttl=0.0, ttl="60s")
            await rig.get("/up")
            assert isinstance(await rig.get("/up"), Reply)
            server.stop()
            down = await rig.get("/up")
            assert (
                header(down, b"x-cache") == b"BYPASS"
                and header(down, b"cache-status") == b"apigate; fwd=bypass"
            )
            again = await rig.get("/up")
            assert header(again, b"x-cache") == b"BYPASS"
            assert rig.layer.bypassed >= 1 and rig.layer.errors >= 1
            server.start()
            rig.ticks.now += 1.0  # RETRY_AFTER: the next request tries Redis again
            found = await rig.get("/up")
            assert header(found, b"cache-status") == b"apigate; fwd=uri-miss; stored"  # Redis restarted empty
            assert isinstance(await rig.get("/up"), Reply)
        finally:
            await state.close()
            server.stop()

    run(scenario())


# -- config -------------------------------------------------------------------------------------------
def test_store_redis_needs_a_redis_in_state_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APIGATE_STATE_URL", raising=False)
    path = tmp_path / "apigate.yaml"
    route = (
        "routes:\n  - path: /x\n    target: http://127.0.0.1:9\n    policies:\n      cache: {store: redis}\n"
    )
    path.write_text(route)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert [(i.line, i.path()) for i in caught.value.issues] == [(5, "routes[0].policies.cache.store")]
    path.write_text("state: {url: 'redis://127.0.0.1:9/0'}\n" + route)
    assert load_config(path).routes[0].policies["cache"] == {"store": "redis"}


def test_the_purge_command_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    config = tmp_path / "apigate.yaml"
    config.write_text(
        "admin: null\nroutes:\n  - {name: r, path: /x, target: 'http://127.0.0.1:9', cache: 60s}\n"
    )

    def purge_command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            apigate_cmd("cache", "purge", *args, "-c", str(config)),
            env=clean_env(APIGATE_STATE_URL="memory://"),
            capture_output=True,
            text=True,
            timeout=60,
        )

    for args, code, said in (
        (("--prefix", "relative"), 2, "a path prefix starts with /"),
        (("--url", "ftp://h/p"), 2, "expected a URL such as"),
        (("--route", "r", "--host", "h"), 2, "--host goes with --prefix"),
        (("--route", "nope"), 1, "no route named 'nope'"),
        (("--all",), 1, "the config has none (admin: null)"),
        (("--all", "--admin", "file:///etc/passwd"), 1, "--admin takes the admin listener's http://"),
        (("--all", "--route", "r"), 2, "not allowed with argument"),
    ):
        done = purge_command(*args)
        assert (done.returncode, said in done.stderr) == (code, True), (args, done.stderr)


# -- real gateways -------------------------------------------------------------------------------------
def get(port: int, path: str, headers: dict[str, str] | None = None) -> RawResponse:
    with RawConnection(port) as conn:
        return conn.exchange("GET", path, headers)


def worker_of(response: RawResponse) -> str:
    """Which worker answered: each worker's request ids start with its own prefix."""
    rid = response.header("x-request-id")
    assert rid is not None
    return rid[:16]


def upstream_rid(response: RawResponse) -> str:
    """The request id of the request the upstream answered: it tells one stored body from another."""
    return response.json()["headers"]["x-request-id"]


def redis_config(redis_url: str, target: str, directory: Path, **cache: Any) -> dict[str, Any]:
    return {
        "store": {"url": f"sqlite:///{directory / 'apigate.db'}"},  # the consumers' store
        "state": {"url": redis_url},
        "consumers": [
            {"id": "partner", "keys": [{"key": KEY}]},
            {"id": "other", "keys": [{"key": OTHER_KEY}]},
        ],
        "routes": [
            {
                "name": "echo",
                "path": "/echo/*",
                "target": target,
                # Hot copies last a minute here: only a purge notice can make a worker drop them in time.
                "policies": {"cache": {"ttl": "60s", "store": "redis", "local_ttl": "60s", **cache}},
            },
            {
                "name": "made",
                "path": "/made/*",
                "target": target,
                "rewrite": "/made",
                "policies": {"cache": {"ttl": "60s", "store": "redis", "max_entry_size": "10KB"}},
            },
            {
                "name": "mine",
                "path": "/mine/*",
                "target": target,
                "rewrite": "/echo",
                "policies": {
                    "key-auth": {},
                    "cache": {"ttl": "60s", "store": "redis", "key_by": ["consumer"]},
                },
            },
        ],
    }


def answers_from_both_workers(
    port: int, path: str, accept: Callable[[RawResponse], bool], limit: float
) -> float:
    """New connections until both workers of the gateway on ``port`` gave an answer ``accept``
    takes; how long that took (fails after ``limit``)."""
    started = time.monotonic()
    accepted: set[str] = set()
    while len(accepted) < 2:
        response = get(port, path)
        if accept(response):
            accepted.add(worker_of(response))
        assert time.monotonic() - started < limit, f"not both workers within {limit}s: {accepted}"
    return time.monotonic() - started


def hit_soon(port: int, path: str, headers: dict[str, str] | None = None, limit: float = 5.0) -> RawResponse:
    """The first HIT for ``path`` (a write to Redis lands a round trip after its response)."""
    deadline = time.monotonic() + limit
    while True:
        response = get(port, path, headers)
        if response.header("x-cache") == "HIT":
            return response
        assert time.monotonic() < deadline, f"no HIT for {path} within {limit}s"
        time.sleep(0.02)


def apigate(*args: str, cwd: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "apigate", *args, "--json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout)


def test_two_gateways_share_redis_and_a_purge_reaches_every_worker_within_a_second(
    redis_url: str, upstream: UpstreamServer, start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    config = redis_config(redis_url, upstream.url, tmp_path)
    a, b = start_gateway(config, workers=2), start_gateway(config)
    first = get(a.port, "/echo/x?b=2&a=1")
    assert first.header("x-cache") == "MISS"
    stored = upstream_rid(first)
    from_b = hit_soon(b.port, "/echo/x?a=1&b=2")
    assert upstream_rid(from_b) == stored  # A's response, read from Redis
    # Both of A's workers hold the entry (a hot copy for a minute).
    answers_from_both_workers(
        a.port,
        "/echo/x?a=1&b=2",
        lambda r: r.header("x-cache") == "HIT" and upstream_rid(r) == stored,
        20,
    )
    upstream_calls = len(upstream.requests)

    other_host = apigate(
        "cache",
        "purge",
        "--url",
        "http://elsewhere.test/echo/x?a=1&b=2",
        "-c",
        str(a.config_path),
        cwd=tmp_path,
    )
    assert other_host["redis_entries_removed"] == 0  # the host is part of the key
    # The query's order does not matter: the key sorts it.
    done = apigate(
        "cache",
        "purge",
        "--url",
        "http://gateway.test/echo/x?b=2&a=1",
        "-c",
        str(a.config_path),
        cwd=tmp_path,
    )
    purged_at = time.monotonic()
    assert done["redis_entries_removed"] == 1

    def renewed(response: RawResponse) -> bool:
        return response.status == 200 and upstream_rid(response) != stored

    answers_from_both_workers(a.port, "/echo/x?a=1&b=2", renewed, 10)
    while not renewed(get(b.port, "/echo/x?a=1&b=2")):
        assert time.monotonic() - purged_at < 10
    reach = time.monotonic() - purged_at
    assert reach < PURGE_REACH, f"the purge took {reach:.3f}s to reach every worker"
    assert len(upstream.requests) > upstream_calls


def test_vary_key_by_and_size_cap_through_gateways_on_redis(
    redis_url: str, upstream: UpstreamServer, start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    config = redis_config(redis_url, upstream.url, tmp_path)
    a, b = start_gateway(config), start_gateway(config)
    # Vary: each language its own entry, served by the other gateway from Redis.
    vary = "/made/v?h=vary:Accept-Language&size=100&body=letters"
    en = get(a.port, vary, {"Accept-Language": "en"})
    de = get(a.port, vary, {"Accept-Language": "de"})
    assert en.header("x-cache") == de.header("x-cache") == "MISS"
    assert hit_soon(b.port, vary, {"Accept-Language": "en"}).body == en.body
    assert hit_soon(b.port, vary, {"Accept-Language": "de"}).body == de.body
    french = get(b.port, vary, {"Accept-Language": "fr"})
    assert french.header("cache-status") == "apigate; fwd=vary-miss; stored", french.headers
    # key_by consumer: one consumer's entry is never another's.
    mine = get(a.port, "/mine/p", {"X-API-Key": KEY})
    assert mine.header("x-cache") == "MISS"
    theirs = get(b.port, "/mine/p", {"X-API-Key": OTHER_KEY})
    assert theirs.header("x-cache") == "MISS" and upstream_rid(theirs) != upstream_rid(mine)
    again = hit_soon(b.port, "/mine/p", {"X-API-Key": KEY})
    assert upstream_rid(again) == upstream_rid(mine)
    assert get(b.port, "/mine/p").status == 401
    # max_entry_size: a larger body is passed on, and nothing of it reaches Redis.
    big = "/made/big?size=20000"
    assert get(a.port, big).body == made_body(20000)
    response = get(b.port, big)
    assert response.header("x-cache") == "MISS" and response.body == made_body(20000)
    client = redis.Redis.from_url(redis_url)
    assert max(len(client.get(key) or b"") for key in client.keys("apigate:{*}:ce:*")) < 10_000
    client.close()


def test_requests_are_served_from_upstream_while_redis_is_stopped(
    upstream: UpstreamServer, start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        gateway = start_gateway(redis_config(server.url, upstream.url, tmp_path, local_ttl="0s"), workers=2)
        assert get(gateway.port, "/echo/r").header("x-cache") == "MISS"
        hit_soon(gateway.port, "/echo/r")  # written to Redis a round trip after the response went
        server.stop()
        for _ in range(20):
            response = get(gateway.port, "/echo/r")
            assert response.status == 200 and response.header("x-cache") == "BYPASS"
        output = gateway.output()
        assert output.count("the cache's Redis cannot be used") <= 2  # once per worker
        server.start()
        hit_soon(gateway.port, "/echo/r", limit=10)  # the cache is back with Redis (empty: one miss)
    finally:
        server.stop()


def test_the_memory_store_of_every_worker_is_purged_through_the_admin_listener(
    upstream: UpstreamServer, start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    admin_port = free_port()
    config = {
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": "admin-token-0123456789"},
        "routes": [{"name": "echo", "path": "/echo/*", "target": upstream.url, "cache": "60s"}],
    }
    gateway = start_gateway(config, workers=2)
    stored: dict[str, str] = {}

    def remembered(response: RawResponse) -> bool:
        # Each worker stores its own answer (no memory is shared); it holds it once it hits.
        worker = worker_of(response)
        if response.header("x-cache") == "MISS":
            stored[worker] = upstream_rid(response)
            return False
        return stored.get(worker) == upstream_rid(response)

    answers_from_both_workers(gateway.port, "/echo/m", remembered, 20)
    deadline = time.monotonic() + 15
    while True:  # the node answers once both workers are linked to it
        done = apigate("cache", "purge", "--prefix", "/echo/", "-c", str(gateway.config_path), cwd=tmp_path)
        if done["workers"] == 2:
            break
        assert time.monotonic() < deadline, done
    assert done["entries_removed"] >= 1

    def renewed(response: RawResponse) -> bool:
        return response.header("x-cache") == "MISS"

    # The command returns once the node heard from both workers: each one misses at once.
    answers_from_both_workers(gateway.port, "/echo/m", renewed, 10)
    assert done["purge"] == "paths under /echo/"
